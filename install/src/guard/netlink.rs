//! A small synchronous nf_tables netlink connection (send a batch and collect its ACKs, or a
//! query and its answers), and a subscription to nf_tables' change notifications. Sockets
//! belong to the netns of the thread that opens them: the installer's own, the node's.

use std::collections::BTreeMap;
use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NetlinkBuffer, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable,
};
use netlink_sys::Socket;
use netlink_sys::protocols::NETLINK_NETFILTER;

/// Receive buffer: larger than any datagram the kernel sends for the guard's small dumps.
const RECV_BUFFER: usize = 64 * 1024;
/// `NFNLGRP_NFTABLES`: the multicast group of nf_tables ruleset changes.
const NFNLGRP_NFTABLES: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(io::Error),
    #[error("netlink send: {0}")]
    Send(io::Error),
    #[error("netlink receive: {0}")]
    Recv(io::Error),
    #[error("netlink message could not be decoded: {0}")]
    Decode(String),
    #[error("{what}: {}", io::Error::from_raw_os_error(*.errno))]
    Kernel { what: String, errno: i32 },
}

impl NetlinkError {
    /// The kernel's errno, when it refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One labelled request of a batch; the label names it in errors.
#[derive(Debug)]
pub struct Labelled<M> {
    pub what: &'static str,
    pub message: NetlinkMessage<M>,
}

#[derive(Debug)]
pub struct Conn {
    socket: Socket,
    next_seq: u32,
}

impl Conn {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        Ok(Self {
            socket,
            next_seq: 1,
        })
    }

    /// Sends every message in one datagram and waits for the ACK of each that asks for one;
    /// the first refusal wins. The kernel commits an nf_tables batch all or nothing.
    pub fn transact<M>(&mut self, messages: Vec<Labelled<M>>) -> Result<(), NetlinkError>
    where
        M: NetlinkSerializable + NetlinkDeserializable,
    {
        let mut pending: BTreeMap<u32, &'static str> = BTreeMap::new();
        let mut first_seq = None;
        let mut datagram = Vec::new();
        for Labelled { what, mut message } in messages {
            let seq = self.stamp(&mut message);
            first_seq.get_or_insert(seq);
            if message.header.flags & NLM_F_ACK != 0 {
                pending.insert(seq, what);
            }
            datagram.extend(serialize(&message));
        }
        self.send(&datagram)?;
        while !pending.is_empty() {
            for message in self.recv::<M>()? {
                let seq = message.header.sequence_number;
                if let NetlinkPayload::Error(e) = message.payload {
                    let what = pending.remove(&seq);
                    if let Some(code) = e.code {
                        // An error on the batch begin (which asks no ACK) fails the whole batch.
                        let what = what.unwrap_or(if Some(seq) == first_seq {
                            "batch"
                        } else {
                            "request"
                        });
                        return Err(NetlinkError::Kernel {
                            what: what.to_owned(),
                            errno: -code.get(),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends one request and returns its answers: the reply of a get or every part of a dump.
    pub fn query<M>(
        &mut self,
        what: &str,
        mut message: NetlinkMessage<M>,
    ) -> Result<Vec<M>, NetlinkError>
    where
        M: NetlinkSerializable + NetlinkDeserializable,
    {
        let dump = message.header.flags & NLM_F_DUMP == NLM_F_DUMP;
        if !dump {
            message.header.flags |= NLM_F_ACK;
        }
        let seq = self.stamp(&mut message);
        self.send(&serialize(&message))?;
        let mut answers = Vec::new();
        loop {
            for message in self.recv::<M>()? {
                if message.header.sequence_number != seq {
                    continue;
                }
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Error(e) => match e.code {
                        Some(code) => {
                            return Err(NetlinkError::Kernel {
                                what: what.to_owned(),
                                errno: -code.get(),
                            });
                        }
                        None => return Ok(answers),
                    },
                    NetlinkPayload::Done(_) => return Ok(answers),
                    _ => {}
                }
            }
        }
    }

    fn stamp<M: NetlinkSerializable>(&mut self, message: &mut NetlinkMessage<M>) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        message.header.sequence_number = seq;
        message.finalize();
        seq
    }

    fn send(&self, datagram: &[u8]) -> Result<(), NetlinkError> {
        let sent = self.socket.send(datagram, 0).map_err(NetlinkError::Send)?;
        if sent != datagram.len() {
            return Err(NetlinkError::Send(io::Error::other(format!(
                "sent {sent} of {} bytes",
                datagram.len()
            ))));
        }
        Ok(())
    }

    fn recv<M>(&self) -> Result<Vec<NetlinkMessage<M>>, NetlinkError>
    where
        M: NetlinkDeserializable,
    {
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        let len = self
            .socket
            .recv(&mut buf, libc::MSG_TRUNC)
            .map_err(NetlinkError::Recv)?;
        if len > buf.len() {
            return Err(NetlinkError::Recv(io::Error::other(format!(
                "datagram of {len} bytes truncated to {}",
                buf.len()
            ))));
        }
        split(&buf)
    }
}

fn serialize<M: NetlinkSerializable>(message: &NetlinkMessage<M>) -> Vec<u8> {
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// Splits a datagram into its netlink messages (each 4-byte aligned).
fn split<M>(mut datagram: &[u8]) -> Result<Vec<NetlinkMessage<M>>, NetlinkError>
where
    M: NetlinkDeserializable,
{
    let mut messages = Vec::new();
    while !datagram.is_empty() {
        let length = NetlinkBuffer::new_checked(datagram)
            .map_err(|e| NetlinkError::Decode(e.to_string()))?
            .length() as usize;
        let message = NetlinkMessage::deserialize(&datagram[..length])
            .map_err(|e| NetlinkError::Decode(e.to_string()))?;
        messages.push(message);
        let aligned = (length + 3) & !3;
        datagram = datagram.get(aligned..).unwrap_or_default();
    }
    Ok(messages)
}

/// A socket subscribed to every nf_tables ruleset change in its netns.
#[derive(Debug)]
pub struct Notifications {
    socket: Socket,
}

impl Notifications {
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .add_membership(NFNLGRP_NFTABLES)
            .map_err(NetlinkError::Socket)?;
        Ok(Self { socket })
    }

    /// Blocks until the ruleset changes. `Ok` also when notifications were lost (ENOBUFS):
    /// either way the caller looks at the table again.
    pub fn wait(&self) -> Result<(), NetlinkError> {
        let mut buf = Vec::with_capacity(RECV_BUFFER);
        match self.socket.recv(&mut buf, 0) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(e) => Err(NetlinkError::Recv(e)),
        }
    }
}
