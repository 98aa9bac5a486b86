//! After CONNECT or a SOCKS connect: either pass the bytes through
//! untouched, checking only that a TLS client names the host it asked for,
//! or, where the policy must see requests, hand over to interception.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::event::Handling;
use crate::proxy::{EventBuilder, Shared};
use crate::sni::{ClientHelloPeek, peek_client_hello};

/// How long to wait for a client to speak first. Protocols where the server
/// speaks first (SSH, SMTP) send nothing; they get a plain tunnel after this.
const FIRST_BYTES_WAIT: Duration = Duration::from_secs(2);
const MAX_PEEK: usize = 16 * 1024;
/// Relay buffer per direction: large transfers cost a fraction of the
/// system calls they would with tokio's 8 KiB default (measured in bench/).
const RELAY_BUFFER: usize = 256 * 1024;

pub(crate) async fn relay<C>(
    shared: Arc<Shared>,
    mut client: C,
    upstream: TcpStream,
    addr: SocketAddr,
    rule: String,
    ev: EventBuilder,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if shared.must_intercept(&ev.host, ev.port) {
        crate::intercept::run(shared, client, upstream, addr, ev).await;
        return;
    }
    let mut first = Vec::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let read = tokio::time::timeout(FIRST_BYTES_WAIT, client.read(&mut buf)).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => {
                let mut event = ev.event(true, &rule, Handling::Tunnel);
                event.address = Some(addr.to_string());
                shared.sink.record(event);
                return;
            }
            Ok(Ok(n)) => first.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
        match peek_client_hello(&first) {
            ClientHelloPeek::NeedMore if first.len() < MAX_PEEK => continue,
            ClientHelloPeek::Complete { sni: Some(sni) } if !same_host(&sni, &ev.host) => {
                let reason = format!(
                    "TLS server name {sni} differs from the requested host {} (domain fronting is refused)",
                    ev.host
                );
                let mut event = ev.event(false, &reason, Handling::Refused);
                event.address = Some(addr.to_string());
                shared.sink.record(event);
                let _ = client.shutdown().await;
                return;
            }
            _ => break,
        }
    }
    let mut upstream = upstream;
    let mut out = first.len() as u64;
    if upstream.write_all(&first).await.is_err() {
        out = 0;
    }
    let (more_out, bytes_in) =
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER)
            .await
            .unwrap_or((0, 0));
    let mut event = ev.event(true, &rule, Handling::Tunnel);
    event.address = Some(addr.to_string());
    event.bytes_out = out + more_out;
    event.bytes_in = bytes_in;
    shared.sink.record(event);
}

fn same_host(sni: &str, host: &str) -> bool {
    sni.trim_end_matches('.').eq_ignore_ascii_case(host.trim_end_matches('.'))
}
