//! `lo` in the pod netns: the redirect lands on 127.0.0.1, which needs `lo` up. Runtimes
//! usually bring it up first, but podid does not depend on that order.

use netlink_packet_core::{NLM_F_REQUEST, NetlinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

use crate::netlink::{Conn, Labelled, NetlinkError};

const LOOPBACK: &str = "lo";

/// Whether `lo` was already up, or podid brought it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loopback {
    WasUp,
    BroughtUp,
}

impl std::fmt::Display for Loopback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::WasUp => "was-up",
            Self::BroughtUp => "brought-up",
        })
    }
}

/// Sets `lo` up in the current thread's netns when it is down.
pub fn ensure_loopback_up() -> Result<Loopback, NetlinkError> {
    let mut conn = Conn::open(NETLINK_ROUTE)?;
    let answers = conn.query("reading link lo", get_link(LOOPBACK))?;
    let link = answers
        .into_iter()
        .find_map(|answer| match answer {
            RouteNetlinkMessage::NewLink(link) => Some(link),
            _ => None,
        })
        .ok_or_else(|| NetlinkError::Unexpected("the kernel sent no link for lo".to_owned()))?;
    if link.header.flags.contains(LinkFlags::Up) {
        return Ok(Loopback::WasUp);
    }
    conn.transact(vec![Labelled {
        what: "setting lo up",
        message: set_up(link.header.index),
    }])?;
    Ok(Loopback::BroughtUp)
}

/// `RTM_GETLINK` by name.
fn get_link(name: &str) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::GetLink(link));
    message.header.flags = NLM_F_REQUEST;
    message
}

/// `RTM_NEWLINK` changing only `IFF_UP`, as `ip link set lo up` sends it.
fn set_up(index: u32) -> NetlinkMessage<RouteNetlinkMessage> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    let mut message = NetlinkMessage::from(RouteNetlinkMessage::NewLink(link));
    message.header.flags = NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK;
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NLM_F_ACK};

    #[test]
    fn set_up_changes_only_iff_up() {
        let mut message = set_up(1);
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.emit(&mut buf);
        // nlmsghdr: RTM_NEWLINK (16), NLM_F_REQUEST | NLM_F_ACK.
        assert_eq!(&buf[4..8], &[16, 0, (NLM_F_REQUEST | NLM_F_ACK) as u8, 0]);
        // ifinfomsg: family 0, pad, type 0, index 1, flags IFF_UP, change IFF_UP.
        assert_eq!(
            &buf[16..32],
            &[0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(buf.len(), 32);
    }

    #[test]
    fn get_link_asks_by_name() {
        let mut message = get_link("lo");
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.emit(&mut buf);
        assert_eq!(&buf[4..6], &[18, 0]);
        // IFLA_IFNAME (3) "lo\0".
        assert_eq!(&buf[32..39], &[7, 0, 3, 0, b'l', b'o', 0]);
    }
}
