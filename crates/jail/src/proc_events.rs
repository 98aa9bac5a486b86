//! The kernel's process events (the proc connector: NETLINK_CONNECTOR,
//! group CN_IDX_PROC), read for one thing: how each process ended. The
//! kernel sends a process's end from `do_exit`, with its exit status,
//! before its parent can reap it, so the status is never lost to a parent
//! that reaps first (which a pidfd before Linux 6.15 cannot say). Listening
//! takes CAP_NET_ADMIN in the initial user namespace and sees the initial
//! PID namespace only: it is for a microVM guest's PID 1, not for a
//! process-tier sandbox.
//!
//! Events are datagrams of kernel-written bytes, parsed strictly all the
//! same. The kernel drops what does not fit the socket's buffer (the next
//! read says ENOBUFS): a reader learns that it lost some, not which.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{self, AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// `CN_IDX_PROC` and `CN_VAL_PROC` (linux/connector.h).
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `PROC_CN_MCAST_LISTEN` (linux/cn_proc.h).
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `PROC_EVENT_EXIT`.
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `NLMSG_DONE`: the type the connector's messages carry.
const NLMSG_DONE: u16 = 3;

const NLMSG_HEADER: usize = 16;
/// `struct cn_msg` before its data.
const CN_MSG_HEADER: usize = 20;
/// In `struct proc_event`: `what`, then the event's data at 16.
const EVENT_DATA: usize = 16;
/// Room for the events of a burst while the reader is busy: an exec flood
/// makes three (fork, exec, exit) per process.
const RECEIVE_BUFFER: usize = 8 << 20;

/// A thread ended. The process has ended when it is its thread group's
/// leader (`pid == tgid`); its threads' ends say nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub tgid: i32,
    /// The wait status its parent will see.
    pub status: i32,
}

/// A subscription to the kernel's process events.
pub struct ProcEvents {
    socket: OwnedFd,
    buf: Vec<u8>,
}

impl ProcEvents {
    /// Subscribes: from now on the kernel sends every process's events.
    pub fn subscribe() -> io::Result<ProcEvents> {
        let socket = net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            Some(net::netlink::CONNECTOR),
        )?;
        // More room than the default for a burst (best effort).
        let _ = net::sockopt::set_socket_recv_buffer_size_force(&socket, RECEIVE_BUFFER);
        net::bind(&socket, &net::netlink::SocketAddrNetlink::new(0, CN_IDX_PROC))?;
        net::sendto(
            &socket,
            &listen_request(),
            SendFlags::empty(),
            &net::netlink::SocketAddrNetlink::new(0, 0),
        )?;
        Ok(ProcEvents { socket, buf: vec![0u8; 64 * 1024] })
    }

    /// What to poll: readable when events wait.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }

    /// Reads every event waiting, without blocking, and hands each end of
    /// a thread to `on_exit`; whether the kernel dropped events since the
    /// last read.
    pub fn drain(&mut self, mut on_exit: impl FnMut(Exit)) -> io::Result<bool> {
        let mut dropped = false;
        loop {
            match net::recv(&self.socket, &mut self.buf[..], RecvFlags::DONTWAIT) {
                Ok((n, _)) => {
                    for exit in exits(&self.buf[..n.min(self.buf.len())]) {
                        on_exit(exit);
                    }
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(dropped),
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::NOBUFS) => dropped = true,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The message that asks the kernel for its process events: a netlink
/// header, a `cn_msg` for the proc connector, the operation.
fn listen_request() -> Vec<u8> {
    let op = PROC_CN_MCAST_LISTEN.to_ne_bytes();
    let len = NLMSG_HEADER + CN_MSG_HEADER + op.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
    msg.extend_from_slice(&(op.len() as u16).to_ne_bytes());
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&op);
    msg
}

fn u32_at(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

/// The ends of threads in one datagram (netlink messages, each a `cn_msg`
/// holding a `proc_event`); anything else, or anything malformed, is
/// skipped.
pub fn exits(datagram: &[u8]) -> Vec<Exit> {
    let mut found = Vec::new();
    let mut at = 0usize;
    while let Some(len) = u32_at(datagram, at).map(|l| l as usize) {
        if len < NLMSG_HEADER || at + len > datagram.len() {
            break;
        }
        let message = &datagram[at..at + len];
        if u16_at(message, 4) == Some(NLMSG_DONE)
            && let Some(exit) = exit_of(&message[NLMSG_HEADER..])
        {
            found.push(exit);
        }
        // Netlink messages are 4-byte aligned.
        at += len.div_ceil(4) * 4;
    }
    found
}

/// The end a `cn_msg` reports, if it is a proc connector's exit event.
fn exit_of(cn_msg: &[u8]) -> Option<Exit> {
    if (u32_at(cn_msg, 0)?, u32_at(cn_msg, 4)?) != (CN_IDX_PROC, CN_VAL_PROC) {
        return None;
    }
    let data_len = usize::from(u16_at(cn_msg, 16)?);
    let event = cn_msg.get(CN_MSG_HEADER..CN_MSG_HEADER.checked_add(data_len)?)?;
    if u32_at(event, 0)? != PROC_EVENT_EXIT {
        return None;
    }
    // struct exit_proc_event: process_pid, process_tgid, exit_code, …
    let pid = i32::try_from(u32_at(event, EVENT_DATA)?).ok()?;
    let tgid = i32::try_from(u32_at(event, EVENT_DATA + 4)?).ok()?;
    let status = i32::try_from(u32_at(event, EVENT_DATA + 8)?).ok()?;
    Some(Exit { pid, tgid, status })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram as the kernel writes it: one message, one event.
    fn event(what: u32, fields: &[u32]) -> Vec<u8> {
        let mut data = Vec::new();
        data.extend_from_slice(&what.to_ne_bytes());
        data.extend_from_slice(&0u32.to_ne_bytes()); // cpu
        data.extend_from_slice(&0u64.to_ne_bytes()); // timestamp
        for f in fields {
            data.extend_from_slice(&f.to_ne_bytes());
        }
        let len = NLMSG_HEADER + CN_MSG_HEADER + data.len();
        let mut msg = Vec::new();
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 10]);
        msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
        msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
        msg.extend_from_slice(&[0u8; 8]);
        msg.extend_from_slice(&(data.len() as u16).to_ne_bytes());
        msg.extend_from_slice(&[0u8; 2]);
        msg.extend_from_slice(&data);
        msg
    }

    #[test]
    fn an_exit_event_gives_the_thread_its_group_and_the_wait_status() {
        let datagram = event(PROC_EVENT_EXIT, &[42, 40, 3 << 8, 17, 1, 1]);
        assert_eq!(exits(&datagram), vec![Exit { pid: 42, tgid: 40, status: 768 }]);
        // Two messages in one datagram, a fork event between.
        let mut two = datagram.clone();
        two.extend(event(0x1, &[1, 1, 50, 50]));
        two.extend(event(PROC_EVENT_EXIT, &[50, 50, 9, 17, 1, 1]));
        assert_eq!(exits(&two).len(), 2);
    }

    #[test]
    fn other_and_malformed_messages_are_skipped() {
        assert!(exits(&event(0x2, &[42, 42])).is_empty(), "an exec event");
        let whole = event(PROC_EVENT_EXIT, &[42, 42, 0, 17, 1, 1]);
        for cut in [0, 3, 16, 30, whole.len() - 1] {
            assert!(exits(&whole[..cut]).is_empty(), "cut at {cut}");
        }
        let mut other_connector = whole.clone();
        other_connector[NLMSG_HEADER] = 7;
        assert!(exits(&other_connector).is_empty());
        let mut short_data = whole;
        short_data[NLMSG_HEADER + 16] = 20;
        assert!(exits(&short_data).is_empty(), "an event too short for an exit's fields");
    }

    #[test]
    fn the_listen_request_is_one_whole_message() {
        let msg = listen_request();
        assert_eq!(u32_at(&msg, 0), Some(msg.len() as u32));
        assert_eq!(u32_at(&msg, NLMSG_HEADER + CN_MSG_HEADER), Some(PROC_CN_MCAST_LISTEN));
    }
}
