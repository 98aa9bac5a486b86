//! Transparent egress: kernel redirection inside the sandbox's own network
//! namespace, installed by the agent while it still holds CAP_NET_ADMIN
//! there (right after loopback comes up), before any untrusted code runs.
//! The command never holds CAP_NET_ADMIN, so it cannot change or remove
//! any of it.
//!
//! Two pieces, both over netlink:
//!
//! - **A default route through loopback** with source 127.0.0.1 (and ::1
//!   with IPv6): without a route `connect()` fails with ENETUNREACH before
//!   a packet reaches the OUTPUT hook, so nothing could be redirected. The
//!   source matters: with none the kernel picks 0.0.0.0, and neither the
//!   replies of the redirected connection nor conntrack's reverse
//!   translation of DNS answers find their way back.
//! - **An nftables table** (`inet airlock`) with two OUTPUT chains:
//!   `nat` (priority -100) redirects DNS (UDP and TCP port 53, any address,
//!   loopback included) to the resolver port and every other TCP
//!   connection not to loopback to the transparent listener (IPv4; IPv6
//!   only with [`Redirect::ipv6`]); `filter` (priority 0, after the
//!   translation) accepts what goes to loopback and rejects everything else
//!   at once: TCP with a reset, any other protocol (UDP, ICMP, SCTP, …)
//!   with an ICMP error, so a sender fails at once instead of hanging.
//!
//! The rules are plain DNAT to the loopback address and port (what nft's
//! `redirect` does on the OUTPUT hook); the kernel keeps the original
//! destination in conntrack, where the agent reads it back
//! (`sys::original_destination`).
//!
//! Messages are encoded with `netlink-bindings` (generated from the
//! kernel's own netlink specifications); the socket handling is here.

use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use netlink_bindings::nftables::{
    self, CmpOps, CtKeys, MetaKeys, Nfgenmsg, PayloadBase, Registers, VerdictCode,
};
use netlink_bindings::rt_route::{self, Rtmsg};
use rustix::net::{AddressFamily, SocketFlags, SocketType, netlink};

pub use crate::plan::Redirect;

/// The table's name, for people reading `nft list ruleset` inside.
pub const TABLE: &CStr = c"airlock";
const NAT_CHAIN: &CStr = c"nat_output";
const FILTER_CHAIN: &CStr = c"filter_output";
const BRIDGED_CHAIN: &CStr = c"nat_prerouting";

// Kernel constants the bindings do not name.
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NF_INET_PRE_ROUTING: u32 = 0;
const NF_INET_LOCAL_OUT: u32 = 3;
const NF_ACCEPT: u32 = 1;
const NF_IP_PRI_NAT_DST: i32 = -100;
const NF_IP_PRI_FILTER: i32 = 0;
const NFT_NAT_DNAT: u32 = 1;
const NF_NAT_RANGE_MAP_IPS: u32 = 1;
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const IP_CT_DIR_REPLY: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const DNS_PORT: u16 = 53;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HEADER: usize = 16;

/// How long the kernel may take to answer a netlink request: it answers
/// at once, so this only bounds a kernel that never does.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("netlink socket ({what}): {source}")]
    Socket { what: &'static str, source: io::Error },
    #[error("{what}: the kernel refused it: {source}")]
    Refused { what: &'static str, source: io::Error },
    #[error("{what}: no answer from the kernel: {source}")]
    NoAnswer { what: &'static str, source: io::Error },
    #[error("{what}: malformed answer from the kernel")]
    Malformed { what: &'static str },
}

/// Installs the routes and the ruleset in the calling process's network
/// namespace (which must have loopback up).
pub fn install(plan: &Redirect) -> Result<(), RedirectError> {
    let lo = loopback_index()?;
    add_default_route(lo, IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    if plan.ipv6 {
        add_default_route(lo, IpAddr::V6(Ipv6Addr::LOCALHOST))?;
    }
    let batch = ruleset(plan, 1);
    let socket = open(Some(netlink::NETFILTER), "nftables")?;
    exchange(&socket, &batch.bytes, &batch.expect_acks, "install the redirection ruleset")
}

/// Extends [`install`]'s redirection (which must be in place) to what
/// arrives from the namespace's other interfaces: in a microVM guest, the
/// bridges its container engine makes, whose containers' traffic enters
/// on the PREROUTING hook, never OUTPUT. A `nat` chain there skips what
/// comes from loopback and redirects DNS and every TCP connection (IPv4:
/// the engine's default bridge has no IPv6) to the same listeners.
///
/// DNAT to 127.0.0.1 of a packet from another interface is dropped as a
/// martian unless `route_localnet` is on, so it is turned on here for every
/// interface (`conf/all`, which the kernel ORs with each interface's):
/// only for a namespace whose every interface but loopback is one of these
/// bridges. What is neither DNS nor TCP is not forwarded (forwarding stays
/// off), so it reaches nothing.
///
/// The OUTPUT filter refuses whatever the namespace's own programs send
/// beyond loopback; the listeners' answers to the bridges' connections are
/// let through ahead of it (`ct direction reply`: only a peer that opened
/// the connection gets them).
pub fn install_for_bridges(plan: &Redirect) -> Result<(), RedirectError> {
    std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", b"1")
        .map_err(|e| RedirectError::Socket { what: "turn route_localnet on", source: e })?;
    let batch = bridged_ruleset(plan, loopback_index()?, 1);
    let socket = open(Some(netlink::NETFILTER), "nftables")?;
    exchange(&socket, &batch.bytes, &batch.expect_acks, "redirect what the bridges bring")
}

/// [`install_for_bridges`]'s transaction: the PREROUTING chain in the
/// existing table and its rules, numbered from `first_seq`.
pub(crate) fn bridged_ruleset(plan: &Redirect, loopback: u32, first_seq: u32) -> Batch {
    let mut c = nftables::Chained::new(first_seq);
    let mut batch_header = Nfgenmsg::new();
    batch_header.set_res_id(NFNL_SUBSYS_NFTABLES);
    let inet = Nfgenmsg { nfgen_family: NFPROTO_INET, ..Default::default() };
    c.request().op_batch_begin_do(&batch_header);
    c.request()
        .set_create()
        .op_newchain_do(&inet)
        .encode()
        .push_table(TABLE)
        .push_name(BRIDGED_CHAIN)
        .push_type(c"nat")
        .push_policy(NF_ACCEPT)
        .nested_hook()
        .push_num(NF_INET_PRE_ROUTING)
        .push_priority(NF_IP_PRI_NAT_DST)
        .end_nested();
    add_rule(&mut c, &inet, FILTER_CHAIN, Rule::new().reply().verdict(VerdictCode::Accept), false);
    append(&mut c, &inet, BRIDGED_CHAIN, Rule::new().input_interface(loopback).verdict(VerdictCode::Accept));
    for proto in [IPPROTO_UDP, IPPROTO_TCP] {
        let rule =
            Rule::new().family(Family::V4).l4proto(proto).dport(DNS_PORT).redirect(Family::V4, plan.dns_port);
        append(&mut c, &inet, BRIDGED_CHAIN, rule);
    }
    let rule = Rule::new().family(Family::V4).l4proto(IPPROTO_TCP).redirect(Family::V4, plan.tcp_port);
    append(&mut c, &inet, BRIDGED_CHAIN, rule);
    end_batch(c, &batch_header, first_seq)
}

fn loopback_index() -> Result<u32, RedirectError> {
    let fd = rustix::net::socket_with(AddressFamily::INET, SocketType::DGRAM, SocketFlags::CLOEXEC, None)
        .map_err(|e| RedirectError::Socket { what: "find loopback", source: e.into() })?;
    rustix::net::netdevice::name_to_index(&fd, "lo")
        .map_err(|e| RedirectError::Socket { what: "find loopback", source: e.into() })
}

fn add_default_route(lo: u32, source: IpAddr) -> Result<(), RedirectError> {
    let mut header = Rtmsg::new();
    header.rtm_family = match source {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    };
    header.rtm_table = RT_TABLE_MAIN;
    header.rtm_protocol = RTPROT_BOOT;
    header.rtm_scope = RT_SCOPE_LINK;
    header.rtm_type = RTN_UNICAST;
    let mut chain = rt_route::Chained::new(1);
    chain
        .request()
        .set_create()
        .set_excl()
        .op_newroute_do(&header)
        .encode()
        .push_oif(lo)
        .push_prefsrc(source);
    let chain = chain.finalize();
    // NETLINK_ROUTE is protocol 0: the default.
    let socket = open(None, "routes")?;
    exchange(&socket, chain.buf(), &[1], "add the default route through loopback")
}

/// One nftables transaction and the sequence numbers whose acknowledgement
/// means it was applied.
pub(crate) struct Batch {
    pub bytes: Vec<u8>,
    pub expect_acks: Vec<u32>,
}

/// The whole ruleset as one transaction (batch begin, table, two chains,
/// rules, batch end), numbered from `first_seq`. Kernels before 6.10 do
/// not acknowledge the batch's begin and end messages, so only the others
/// are waited for.
pub(crate) fn ruleset(plan: &Redirect, first_seq: u32) -> Batch {
    let mut c = nftables::Chained::new(first_seq);
    let mut batch_header = Nfgenmsg::new();
    batch_header.set_res_id(NFNL_SUBSYS_NFTABLES);
    let inet = Nfgenmsg { nfgen_family: NFPROTO_INET, ..Default::default() };

    c.request().op_batch_begin_do(&batch_header);
    c.request().set_create().op_newtable_do(&inet).encode().push_name(TABLE);
    for (name, kind, priority) in
        [(NAT_CHAIN, c"nat", NF_IP_PRI_NAT_DST), (FILTER_CHAIN, c"filter", NF_IP_PRI_FILTER)]
    {
        c.request()
            .set_create()
            .op_newchain_do(&inet)
            .encode()
            .push_table(TABLE)
            .push_name(name)
            .push_type(kind)
            .push_policy(NF_ACCEPT)
            .nested_hook()
            .push_num(NF_INET_LOCAL_OUT)
            .push_priority(priority)
            .end_nested();
    }
    let mut families = vec![Family::V4];
    if plan.ipv6 {
        families.push(Family::V6);
    }
    // nat: DNS first (to any address, loopback too), then loopback stays
    // as it is, then every other TCP connection goes to the listener.
    for family in &families {
        for proto in [IPPROTO_UDP, IPPROTO_TCP] {
            let rule =
                Rule::new().family(*family).l4proto(proto).dport(DNS_PORT).redirect(*family, plan.dns_port);
            append(&mut c, &inet, NAT_CHAIN, rule);
        }
        append(
            &mut c,
            &inet,
            NAT_CHAIN,
            Rule::new().family(*family).loopback_destination(*family).verdict(VerdictCode::Accept),
        );
        let rule = Rule::new().family(*family).l4proto(IPPROTO_TCP).redirect(*family, plan.tcp_port);
        append(&mut c, &inet, NAT_CHAIN, rule);
    }
    // filter: after translation, whatever still goes anywhere but loopback
    // is refused at once, whatever the family or protocol.
    for family in [Family::V4, Family::V6] {
        let rule = Rule::new().family(family).loopback_destination(family).verdict(VerdictCode::Accept);
        append(&mut c, &inet, FILTER_CHAIN, rule);
    }
    append(&mut c, &inet, FILTER_CHAIN, Rule::new().l4proto(IPPROTO_TCP).reject(NFT_REJECT_TCP_RST, 0));
    append(
        &mut c,
        &inet,
        FILTER_CHAIN,
        Rule::new().reject(NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_ADMIN_PROHIBITED),
    );
    end_batch(c, &batch_header, first_seq)
}

/// Closes a batch begun at `first_seq`: its bytes, and the sequence
/// numbers of the messages between begin and end, each of which the
/// kernel acknowledges.
fn end_batch(mut c: nftables::Chained<'static>, header: &Nfgenmsg, first_seq: u32) -> Batch {
    c.request().op_batch_end_do(header);
    let chain = c.finalize();
    let bytes = chain.buf().clone();
    let count = count_messages(&bytes);
    let expect_acks = (1..count.saturating_sub(1)).map(|i| first_seq.wrapping_add(i)).collect();
    Batch { bytes, expect_acks }
}

fn append(c: &mut nftables::Chained<'static>, header: &Nfgenmsg, chain: &CStr, rule: Rule) {
    add_rule(c, header, chain, rule, true);
}

/// A rule at the end of `chain`, or at its start.
fn add_rule(c: &mut nftables::Chained<'static>, header: &Nfgenmsg, chain: &CStr, rule: Rule, at_end: bool) {
    let request = c.request().set_create();
    let request = if at_end { request.set_append() } else { request };
    let mut op = request.op_newrule_do(header);
    let mut list = op.encode().push_table(TABLE).push_chain(chain).nested_expressions();
    for expr in rule.exprs {
        list = match expr {
            Expr::Meta { key } => list
                .nested_elem()
                .nested_data_meta()
                .push_key(key as u32)
                .push_dreg(Registers::Reg1 as u32)
                .end_nested()
                .end_nested(),
            Expr::Ct { key } => list
                .nested_elem()
                .nested_data_ct()
                .push_key(key as u32)
                .push_dreg(Registers::Reg1 as u32)
                .end_nested()
                .end_nested(),
            Expr::Payload { base, offset, len } => list
                .nested_elem()
                .nested_data_payload()
                .push_dreg(Registers::Reg1 as u32)
                .push_base(base as u32)
                .push_offset(offset)
                .push_len(len)
                .end_nested()
                .end_nested(),
            Expr::CmpEq { value } => list
                .nested_elem()
                .nested_data_cmp()
                .push_sreg(Registers::Reg1 as u32)
                .push_op(CmpOps::Eq as u32)
                .nested_data()
                .push_value(&value)
                .end_nested()
                .end_nested()
                .end_nested(),
            Expr::Load { register, value } => list
                .nested_elem()
                .nested_data_immediate()
                .push_dreg(register as u32)
                .nested_data()
                .push_value(&value)
                .end_nested()
                .end_nested()
                .end_nested(),
            Expr::Dnat { family } => list
                .nested_elem()
                .nested_data_nat()
                .push_type(NFT_NAT_DNAT)
                .push_family(u32::from(family.nfproto()))
                .push_reg_addr_min(Registers::Reg1 as u32)
                .push_reg_proto_min(Registers::Reg2 as u32)
                .push_flags(NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED)
                .end_nested()
                .end_nested(),
            Expr::Verdict { code } => list
                .nested_elem()
                .nested_data_immediate()
                .push_dreg(Registers::RegVerdict as u32)
                .nested_data()
                .nested_verdict()
                .push_code(code as u32)
                .end_nested()
                .end_nested()
                .end_nested()
                .end_nested(),
            Expr::Reject { kind, code } => list
                .nested_elem()
                .nested_data_reject()
                .push_type(kind)
                .push_icmp_code(code)
                .end_nested()
                .end_nested(),
        };
    }
    list.end_nested();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn nfproto(self) -> u8 {
        match self {
            Family::V4 => NFPROTO_IPV4,
            Family::V6 => NFPROTO_IPV6,
        }
    }
}

/// One expression of a rule; every match loads into register 1.
#[derive(Debug, Clone)]
enum Expr {
    Meta { key: MetaKeys },
    Ct { key: CtKeys },
    Payload { base: PayloadBase, offset: u32, len: u32 },
    CmpEq { value: Vec<u8> },
    Load { register: Registers, value: Vec<u8> },
    Dnat { family: Family },
    Verdict { code: VerdictCode },
    Reject { kind: u32, code: u8 },
}

/// A rule as a list of expressions, built like nft's syntax reads.
#[derive(Debug, Default)]
struct Rule {
    exprs: Vec<Expr>,
}

impl Rule {
    fn new() -> Rule {
        Rule::default()
    }

    /// `meta nfproto ipv4|ipv6`
    fn family(mut self, family: Family) -> Rule {
        self.exprs.push(Expr::Meta { key: MetaKeys::Nfproto });
        self.exprs.push(Expr::CmpEq { value: vec![family.nfproto()] });
        self
    }

    /// `meta l4proto tcp|udp`
    fn l4proto(mut self, proto: u8) -> Rule {
        self.exprs.push(Expr::Meta { key: MetaKeys::L4Proto });
        self.exprs.push(Expr::CmpEq { value: vec![proto] });
        self
    }

    /// `meta iif INDEX`
    fn input_interface(mut self, index: u32) -> Rule {
        self.exprs.push(Expr::Meta { key: MetaKeys::Iif });
        self.exprs.push(Expr::CmpEq { value: index.to_ne_bytes().to_vec() });
        self
    }

    /// `ct direction reply`: a packet answering a connection that came in.
    fn reply(mut self) -> Rule {
        self.exprs.push(Expr::Ct { key: CtKeys::Direction });
        self.exprs.push(Expr::CmpEq { value: vec![IP_CT_DIR_REPLY] });
        self
    }

    /// `th dport PORT` (TCP and UDP keep the port at the same offset)
    fn dport(mut self, port: u16) -> Rule {
        self.exprs.push(Expr::Payload { base: PayloadBase::TransportHeader, offset: 2, len: 2 });
        self.exprs.push(Expr::CmpEq { value: port.to_be_bytes().to_vec() });
        self
    }

    /// `ip daddr 127.0.0.0/8` (its first byte) or `ip6 daddr ::1`
    fn loopback_destination(mut self, family: Family) -> Rule {
        let (offset, value) = match family {
            Family::V4 => (16, vec![127]),
            Family::V6 => (24, Ipv6Addr::LOCALHOST.octets().to_vec()),
        };
        let len = u32::try_from(value.len()).unwrap_or(16);
        self.exprs.push(Expr::Payload { base: PayloadBase::NetworkHeader, offset, len });
        self.exprs.push(Expr::CmpEq { value });
        self
    }

    /// `dnat ip to 127.0.0.1:PORT` / `dnat ip6 to [::1]:PORT`
    fn redirect(mut self, family: Family, port: u16) -> Rule {
        let address = match family {
            Family::V4 => Ipv4Addr::LOCALHOST.octets().to_vec(),
            Family::V6 => Ipv6Addr::LOCALHOST.octets().to_vec(),
        };
        self.exprs.push(Expr::Load { register: Registers::Reg1, value: address });
        self.exprs.push(Expr::Load { register: Registers::Reg2, value: port.to_be_bytes().to_vec() });
        self.exprs.push(Expr::Dnat { family });
        self
    }

    fn verdict(mut self, code: VerdictCode) -> Rule {
        self.exprs.push(Expr::Verdict { code });
        self
    }

    fn reject(mut self, kind: u32, code: u8) -> Rule {
        self.exprs.push(Expr::Reject { kind, code });
        self
    }
}

fn open(protocol: Option<rustix::net::Protocol>, what: &'static str) -> Result<OwnedFd, RedirectError> {
    let fd =
        rustix::net::socket_with(AddressFamily::NETLINK, SocketType::RAW, SocketFlags::CLOEXEC, protocol)
            .map_err(|e| RedirectError::Socket { what, source: e.into() })?;
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, Some(ANSWER_TIMEOUT))
        .map_err(|e| RedirectError::Socket { what, source: e.into() })?;
    Ok(fd)
}

/// Sends `request` (whole netlink messages) in one write, as nftables
/// requires of a transaction, and reads answers until every sequence
/// number in `expect_acks` is acknowledged; the first error wins.
fn exchange(
    socket: &OwnedFd,
    request: &[u8],
    expect_acks: &[u32],
    what: &'static str,
) -> Result<(), RedirectError> {
    let sent = rustix::net::send(socket, request, rustix::net::SendFlags::empty())
        .map_err(|e| RedirectError::Socket { what, source: e.into() })?;
    if sent != request.len() {
        return Err(RedirectError::Socket { what, source: io::Error::other("the request was sent in part") });
    }
    let mut pending: Vec<u32> = expect_acks.to_vec();
    let mut buf = vec![0u8; 64 * 1024];
    while !pending.is_empty() {
        let (n, _) = rustix::net::recv(socket, &mut buf[..], rustix::net::RecvFlags::empty())
            .map_err(|e| RedirectError::NoAnswer { what, source: e.into() })?;
        for answer in acks(&buf[..n.min(buf.len())]).ok_or(RedirectError::Malformed { what })? {
            let (seq, errno) = answer;
            if errno != 0 {
                return Err(RedirectError::Refused { what, source: io::Error::from_raw_os_error(errno) });
            }
            pending.retain(|s| *s != seq);
        }
    }
    Ok(())
}

/// The acknowledgements (sequence number, errno; 0 for success) in one
/// read from a netlink socket; other messages are skipped. `None` when the
/// bytes are not whole netlink messages.
pub(crate) fn acks(mut bytes: &[u8]) -> Option<Vec<(u32, i32)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let header = bytes.get(..NLMSG_HEADER)?;
        let len = u32::from_ne_bytes(header[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(header[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(header[8..12].try_into().ok()?);
        if len < NLMSG_HEADER || len > bytes.len() {
            return None;
        }
        if kind == NLMSG_ERROR {
            let code = i32::from_ne_bytes(bytes.get(NLMSG_HEADER..NLMSG_HEADER + 4)?.try_into().ok()?);
            out.push((seq, code.checked_neg()?));
        }
        let aligned = len.checked_add(3)? & !3;
        bytes = bytes.get(aligned.min(bytes.len())..)?;
    }
    Some(out)
}

fn count_messages(mut bytes: &[u8]) -> u32 {
    let mut count = 0;
    while bytes.len() >= NLMSG_HEADER {
        let len = u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        if len < NLMSG_HEADER {
            break;
        }
        count += 1;
        let aligned = (len + 3) & !3;
        bytes = &bytes[aligned.min(bytes.len())..];
    }
    count
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsFd;

    use super::*;
    use crate::privileges::test_fork::run_in_child;

    const PLAN: Redirect = Redirect { tcp_port: 3129, dns_port: 3053, ipv6: false };

    #[test]
    fn the_ruleset_is_one_transaction_waiting_for_every_rule() {
        let batch = ruleset(&PLAN, 100);
        // begin, table, 2 chains, 4 nat rules (IPv4), 4 filter rules, end
        assert_eq!(count_messages(&batch.bytes), 13);
        assert_eq!(batch.expect_acks, (101..112).collect::<Vec<_>>());
        // IPv6 adds its four nat rules.
        let with_v6 = ruleset(&Redirect { ipv6: true, ..PLAN }, 1);
        assert_eq!(count_messages(&with_v6.bytes), 17);
    }

    #[test]
    fn the_bridges_chain_is_one_transaction_too() {
        let batch = bridged_ruleset(&PLAN, 1, 10);
        // begin, chain, replies' accept, loopback's accept, DNS over UDP
        // and TCP, TCP, end
        assert_eq!(count_messages(&batch.bytes), 8);
        assert_eq!(batch.expect_acks, (11..17).collect::<Vec<_>>());
    }

    #[test]
    fn acknowledgements_are_read_strictly() {
        let ack = |seq: u32, errno: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&seq.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&(-errno).to_ne_bytes());
            m.extend_from_slice(&[0u8; 16]);
            m
        };
        let two = [ack(3, 0), ack(4, libc::EPERM)].concat();
        assert_eq!(acks(&two), Some(vec![(3, 0), (4, libc::EPERM)]));
        assert_eq!(acks(&two[..two.len() - 1]), None);
        assert_eq!(acks(&[1, 0, 0, 0]), None);
        let mut short = ack(1, 0);
        short[0] = 8;
        assert_eq!(acks(&short), None);
        assert_eq!(acks(&[]), Some(vec![]));
    }

    fn in_new_network_namespace(test: impl FnOnce() -> i32) -> i32 {
        run_in_child(|| {
            // A user namespace makes this work without root, as airlock's
            // rootless sandboxes do.
            let flags = if rustix::process::geteuid().is_root() {
                libc::CLONE_NEWNET
            } else {
                libc::CLONE_NEWUSER | libc::CLONE_NEWNET
            };
            if let Err(e) = crate::sys::raw_unshare(flags) {
                eprintln!("unshare: {e}");
                return 90;
            }
            if let Err(e) = crate::sys::set_loopback_up() {
                eprintln!("loopback: {e}");
                return 91;
            }
            test()
        })
    }

    /// The real thing in a fresh network namespace: TCP to a documentation
    /// address reaches the listener with its original destination, DNS to
    /// any address reaches the resolver port and its answer comes back from
    /// the address asked, other UDP and IPv6 fail at once, and a direct
    /// connection to the listener reads as not redirected.
    #[test]
    fn connections_reach_the_listeners_with_their_destination() {
        let code = in_new_network_namespace(|| {
            if let Err(e) = install(&PLAN) {
                eprintln!("install: {e}");
                return 1;
            }
            let listener = TcpListener::bind(("127.0.0.1", PLAN.tcp_port)).unwrap();
            let resolver = UdpSocket::bind(("127.0.0.1", PLAN.dns_port)).unwrap();
            let dns_tcp = TcpListener::bind(("127.0.0.1", PLAN.dns_port)).unwrap();

            let mut client = TcpStream::connect("203.0.113.9:22").unwrap();
            let (mut accepted, _) = listener.accept().unwrap();
            let original = crate::sys::original_destination(accepted.as_fd()).unwrap();
            assert_eq!(original, "203.0.113.9:22".parse::<SocketAddr>().unwrap());
            accepted.write_all(b"hi").unwrap();
            let mut got = [0u8; 2];
            client.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hi");

            let _direct = TcpStream::connect(("127.0.0.1", PLAN.tcp_port)).unwrap();
            let (direct, _) = listener.accept().unwrap();
            let own = crate::sys::original_destination(direct.as_fd()).unwrap();
            assert!(own.ip().is_loopback(), "{own}");

            for to in ["192.0.2.53:53", "127.0.0.1:53"] {
                let asker = UdpSocket::bind("127.0.0.1:0").unwrap();
                asker.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                asker.send_to(b"query", to).unwrap();
                let mut buf = [0u8; 16];
                let (n, from) = resolver.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"query");
                resolver.send_to(b"answer", from).unwrap();
                let (n, answered_from) = asker.recv_from(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"answer");
                assert_eq!(answered_from, to.parse::<SocketAddr>().unwrap(), "the answer's source");
            }
            let _dns_stream = TcpStream::connect("198.51.100.53:53").unwrap();
            let (stream, _) = dns_tcp.accept().unwrap();
            assert_eq!(
                crate::sys::original_destination(stream.as_fd()).unwrap(),
                "198.51.100.53:53".parse::<SocketAddr>().unwrap()
            );

            let started = std::time::Instant::now();
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            let refused = udp.send_to(b"x", "198.51.100.1:9999");
            assert!(refused.is_err(), "UDP beyond DNS went out");
            let v6 = TcpStream::connect_timeout(&"[2001:db8::1]:80".parse().unwrap(), Duration::from_secs(5));
            assert!(v6.is_err(), "IPv6 without a plan for it connected");
            assert!(started.elapsed() < Duration::from_secs(1), "a refusal took {:?}", started.elapsed());
            0
        });
        assert_eq!(code, 0);
    }

    #[test]
    fn ipv6_connections_are_redirected_when_planned() {
        let code = in_new_network_namespace(|| {
            let plan = Redirect { ipv6: true, ..PLAN };
            if let Err(e) = install(&plan) {
                eprintln!("install: {e}");
                return 1;
            }
            let listener = TcpListener::bind(("::1", plan.tcp_port)).unwrap();
            let _client = TcpStream::connect("[2001:db8::7]:443").unwrap();
            let (accepted, _) = listener.accept().unwrap();
            assert_eq!(
                crate::sys::original_destination(accepted.as_fd()).unwrap(),
                "[2001:db8::7]:443".parse::<SocketAddr>().unwrap()
            );
            0
        });
        assert_eq!(code, 0);
    }
}
