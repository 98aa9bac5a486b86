//! The SOCKS5 port (RFC 1928), CONNECT only, no authentication: for tools
//! that take ALL_PROXY=socks5h://. Names are resolved by the proxy, never
//! inside the sandbox.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::event::Handling;
use crate::proxy::{EventBuilder, Port, Refusal, Shared, open_upstream};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CMD_CONNECT: u8 = 1;
const REPLY_OK: u8 = 0;
const REPLY_NOT_ALLOWED: u8 = 2;
const REPLY_HOST_UNREACHABLE: u8 = 4;
const REPLY_COMMAND_NOT_SUPPORTED: u8 = 7;
const REPLY_ADDRESS_NOT_SUPPORTED: u8 = 8;

pub(crate) async fn serve(shared: Arc<Shared>, mut client: TcpStream) {
    let Ok((host, port)) = handshake(&mut client).await else { return };
    let ev = EventBuilder::new(Port::Socks, &host, port);
    match open_upstream(&shared, &host, port).await {
        Ok((upstream, addr, rule)) => {
            if reply(&mut client, REPLY_OK).await.is_err() {
                return;
            }
            if let Some(mut refused) = crate::tunnel::relay(shared, client, upstream, addr, rule, ev).await {
                let _ = refused.shutdown().await;
            }
        }
        Err(refusal) => {
            let code = match refusal {
                Refusal::Policy(_) => REPLY_NOT_ALLOWED,
                Refusal::Unreachable(_) => REPLY_HOST_UNREACHABLE,
            };
            shared.sink.record(ev.event(
                matches!(refusal, Refusal::Unreachable(_)),
                refusal.reason(),
                Handling::Refused,
            ));
            let _ = reply(&mut client, code).await;
        }
    }
}

#[derive(Debug)]
struct Malformed;

impl From<std::io::Error> for Malformed {
    fn from(_: std::io::Error) -> Self {
        Malformed
    }
}

/// Method negotiation and the request; returns the target.
async fn handshake(client: &mut TcpStream) -> Result<(String, u16), Malformed> {
    let mut head = [0u8; 2];
    client.read_exact(&mut head).await?;
    if head[0] != VERSION {
        return Err(Malformed);
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        client.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(Malformed);
    }
    client.write_all(&[VERSION, NO_AUTH]).await?;

    let mut req = [0u8; 4];
    client.read_exact(&mut req).await?;
    if req[0] != VERSION {
        return Err(Malformed);
    }
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a).await?;
            Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await?;
            match String::from_utf8(name) {
                Ok(n) if !n.is_empty() => n.to_ascii_lowercase().trim_end_matches('.').to_string(),
                _ => {
                    let _ = reply(client, REPLY_ADDRESS_NOT_SUPPORTED).await;
                    return Err(Malformed);
                }
            }
        }
        4 => {
            let mut a = [0u8; 16];
            client.read_exact(&mut a).await?;
            Ipv6Addr::from(a).to_string()
        }
        _ => {
            let _ = reply(client, REPLY_ADDRESS_NOT_SUPPORTED).await;
            return Err(Malformed);
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    if req[1] != CMD_CONNECT {
        // BIND and UDP ASSOCIATE: no UDP and no inbound connections.
        let _ = reply(client, REPLY_COMMAND_NOT_SUPPORTED).await;
        return Err(Malformed);
    }
    Ok((host, u16::from_be_bytes(port)))
}

async fn reply(client: &mut TcpStream, code: u8) -> std::io::Result<()> {
    client.write_all(&[VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
