//! The nf_tables messages of the per-pod redirect (DESIGN.md "nftables in the pod netns"),
//! and the decoding of what the kernel reports back. Pure: no socket here.
//!
//! ```text
//! table ip podid {
//!   comment "<containerId>"
//!   chain output {
//!     type nat hook output priority -100; policy accept;
//!     ip daddr 169.254.169.254 tcp dport 80 redirect to :<listener port>
//!   }
//! }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

use netlink_packet_core::{
    DefaultNla, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
    NetlinkMessage, Nla,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    HookNumber, Immediate, InetHookNumber, ListAttribute, Meta, MetaKey, NfTablesMessage, Operator,
    Payload, Register, RuleAttribute, RuleMessage, TableAttribute, TableMessage,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterProtoFamily};
use podid_api::defaults::{METADATA_PORT, NFT_CHAIN, NFT_TABLE};

use crate::netlink::Labelled;

/// `NFNL_SUBSYS_NFTABLES`: the batch begin/end messages carry it as their resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFTNL_UDATA_TABLE_COMMENT`: the TLV type under which nft keeps a table's comment.
const UDATA_TABLE_COMMENT: u8 = 0;
/// `NFTA_REDIR_REG_PROTO_MIN`, `_MAX` and `NFTA_REDIR_FLAGS` of the kernel's `redir` expression.
const NFTA_REDIR_REG_PROTO_MIN: u16 = 1;
const NFTA_REDIR_REG_PROTO_MAX: u16 = 2;
const NFTA_REDIR_FLAGS: u16 = 3;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the kernel may report this flag for a redirect to a port.
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
/// `NF_ACCEPT`, the chain policy.
const NF_ACCEPT: u32 = 1;
/// `NF_IP_PRI_NAT_DST`: nft's `dstnat` priority.
pub const PRIORITY_DSTNAT: i32 = -100;
/// `NFT_PAYLOAD_NETWORK_HEADER` and `NFT_PAYLOAD_TRANSPORT_HEADER`.
const BASE_NETWORK: u32 = 1;
const BASE_TRANSPORT: u32 = 2;
/// Offset of the destination address in the IPv4 header, and of the port in the TCP header.
const IPV4_DADDR_OFFSET: u32 = 16;
const TCP_DPORT_OFFSET: u32 = 2;
const IPPROTO_TCP: u8 = 6;
/// The register the rule works in; the kernel reports it back with the same number.
const REG: Register = Register::Reg1;

/// What the rule does: TCP to `daddr:dport` goes to `127.0.0.1:to_port` in the same netns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect {
    pub daddr: Ipv4Addr,
    pub dport: u16,
    pub to_port: u16,
}

impl Redirect {
    /// The metadata endpoint's redirect to tokend's listener.
    pub fn metadata(daddr: Ipv4Addr, to_port: u16) -> Self {
        Self {
            daddr,
            dport: METADATA_PORT,
            to_port,
        }
    }
}

impl fmt::Display for Redirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ip daddr {} tcp dport {} redirect to :{}",
            self.daddr, self.dport, self.to_port
        )
    }
}

/// How ADD's batch treats an existing table `ip podid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// No table yet: create it exclusively (EEXIST if one appeared meanwhile). Nothing is
    /// deleted, so closing the socket does not wait for nf_tables' RCU-deferred destruction.
    Fresh,
    /// Create the table if absent (so the delete cannot fail), delete it, create it again.
    Replace,
}

/// The one atomic batch of ADD: table `ip podid` tagged with the container id, its chain and
/// its rule, replacing whatever table of that name was there.
pub fn install_batch(
    container_id: &str,
    redirect: &Redirect,
    mode: Install,
) -> Vec<Labelled<NetfilterMessage>> {
    let tagged_table = |flags| {
        request(
            "creating table ip podid with its comment",
            NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Name(NFT_TABLE.to_owned()),
                    TableAttribute::UserData(comment_userdata(container_id)),
                ],
            }),
            flags,
        )
    };
    let mut batch = vec![control(ControlMessage::BatchBegin)];
    match mode {
        Install::Fresh => batch.push(tagged_table(NLM_F_CREATE | NLM_F_EXCL)),
        Install::Replace => batch.extend([
            request(
                "creating table ip podid",
                NfTablesMessage::NewTable(TableMessage {
                    attributes: vec![TableAttribute::Name(NFT_TABLE.to_owned())],
                }),
                NLM_F_CREATE,
            ),
            request(
                "deleting the old table ip podid",
                NfTablesMessage::DeleteTable(TableMessage {
                    attributes: vec![TableAttribute::Name(NFT_TABLE.to_owned())],
                }),
                0,
            ),
            tagged_table(NLM_F_CREATE),
        ]),
    }
    batch.extend([
        request(
            "creating chain output",
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(NFT_TABLE.to_owned()),
                    ChainAttribute::Name(NFT_CHAIN.to_owned()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(InetHookNumber::LocalOut)),
                        Hook::Priority(PRIORITY_DSTNAT as u32),
                    ]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type("nat".to_owned()),
                ],
            }),
            NLM_F_CREATE,
        ),
        request(
            "adding the redirect rule",
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(NFT_TABLE.to_owned()),
                    RuleAttribute::Chain(NFT_CHAIN.to_owned()),
                    RuleAttribute::Expressions(redirect_expressions(redirect)),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND,
        ),
        control(ControlMessage::BatchEnd),
    ]);
    batch
}

/// The batch of DEL: delete the table by its handle, so a table created after we looked at it
/// (another pod's, after PID reuse) is never the one deleted.
pub fn delete_batch(handle: u64) -> Vec<Labelled<NetfilterMessage>> {
    vec![
        control(ControlMessage::BatchBegin),
        request(
            "deleting table ip podid",
            NfTablesMessage::DeleteTable(TableMessage {
                attributes: vec![TableAttribute::Handle(handle)],
            }),
            0,
        ),
        control(ControlMessage::BatchEnd),
    ]
}

/// `NFT_MSG_GETTABLE` for `ip podid`.
pub fn get_table() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(NFT_TABLE.to_owned())],
        }),
        0,
    )
}

/// A dump of every chain of `ip podid`.
pub fn dump_chains() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![ChainAttribute::Table(NFT_TABLE.to_owned())],
        }),
        NLM_F_DUMP,
    )
}

/// A dump of every rule of `ip podid` chain `output`.
pub fn dump_rules() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![
                RuleAttribute::Table(NFT_TABLE.to_owned()),
                RuleAttribute::Chain(NFT_CHAIN.to_owned()),
            ],
        }),
        NLM_F_DUMP,
    )
}

/// The rule's expressions: `meta l4proto tcp`, `ip daddr`, `tcp dport`, then the port into the
/// register and `redir` from it.
pub fn redirect_expressions(redirect: &Redirect) -> Vec<ListAttribute<ExpressionAttribute>> {
    let cmp_eq = |value: Vec<u8>| {
        Expressions::Cmp(vec![
            Cmp::SourceRegister(REG),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(value)),
        ])
    };
    let payload = |base, offset, len| {
        Expressions::Payload(vec![
            Payload::DestinationRegister(REG),
            Payload::Base(base),
            Payload::Offset(offset),
            Payload::Len(len),
        ])
    };
    vec![
        Expressions::Meta(vec![
            Meta::Key(MetaKey::L4Proto),
            Meta::DestinationRegister(REG),
        ])
        .into(),
        cmp_eq(vec![IPPROTO_TCP]).into(),
        payload(BASE_NETWORK, IPV4_DADDR_OFFSET, 4).into(),
        cmp_eq(redirect.daddr.octets().to_vec()).into(),
        payload(BASE_TRANSPORT, TCP_DPORT_OFFSET, 2).into(),
        cmp_eq(redirect.dport.to_be_bytes().to_vec()).into(),
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(REG),
            Immediate::Data(DataAttribute::Value(
                redirect.to_port.to_be_bytes().to_vec(),
            )),
        ])
        .into(),
        Expressions::Other {
            expression_type: "redir".to_owned(),
            attributes: vec![DefaultNla::new(
                NFTA_REDIR_REG_PROTO_MIN,
                u32::from(REG).to_be_bytes().to_vec(),
            )],
        }
        .into(),
    ]
}

/// nft's table comment: one TLV, type `NFTNL_UDATA_TABLE_COMMENT`, the text and its NUL.
pub fn comment_userdata(comment: &str) -> Vec<u8> {
    let mut value = comment.as_bytes().to_vec();
    value.push(0);
    // Container ids are at most 234 bytes (`podid_api::pod::MAX_CONTAINER_ID_LEN`): the length fits.
    let mut tlv = vec![UDATA_TABLE_COMMENT, value.len() as u8];
    tlv.extend(value);
    tlv
}

/// The comment in a table's userdata, if it has a well-formed one.
pub fn comment_of(mut userdata: &[u8]) -> Option<String> {
    while let [kind, len, rest @ ..] = userdata {
        let value = rest.get(..usize::from(*len))?;
        if *kind == UDATA_TABLE_COMMENT {
            let text = value.strip_suffix(&[0])?;
            return String::from_utf8(text.to_vec()).ok();
        }
        userdata = &rest[usize::from(*len)..];
    }
    None
}

/// What podid needs to know about a table the kernel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableInfo {
    pub handle: Option<u64>,
    pub comment: Option<String>,
}

/// What podid needs to know about a chain the kernel reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    pub chain_type: Option<String>,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<u32>,
}

impl fmt::Display for ChainInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<String>| v.unwrap_or_else(|| "none".to_owned());
        write!(
            f,
            "chain {} (type {}, hook {}, priority {}, policy {})",
            self.name,
            show(self.chain_type.clone()),
            show(self.hook.map(|h| h.to_string())),
            show(self.priority.map(|p| p.to_string())),
            show(self.policy.map(|p| p.to_string())),
        )
    }
}

pub fn table_info(message: &NetfilterMessage) -> Option<TableInfo> {
    let nft = nftables(message)?;
    let NfTablesMessage::NewTable(table) = nft else {
        return None;
    };
    let mut info = TableInfo::default();
    for attribute in &table.attributes {
        match attribute {
            TableAttribute::Handle(handle) => info.handle = Some(*handle),
            TableAttribute::UserData(data) => info.comment = comment_of(data),
            _ => {}
        }
    }
    Some(info)
}

pub fn chain_info(message: &NetfilterMessage) -> Option<ChainInfo> {
    let NfTablesMessage::NewChain(chain) = nftables(message)? else {
        return None;
    };
    // Chain dumps are not filtered by table in every kernel.
    let ours = chain
        .attributes
        .iter()
        .any(|a| matches!(a, ChainAttribute::Table(t) if t == NFT_TABLE));
    if !ours {
        return None;
    }
    let mut info = ChainInfo::default();
    for attribute in &chain.attributes {
        match attribute {
            ChainAttribute::Name(name) => info.name = name.clone(),
            ChainAttribute::Type(chain_type) => info.chain_type = Some(chain_type.clone()),
            ChainAttribute::Policy(policy) => info.policy = Some(*policy),
            ChainAttribute::Hook(hooks) => {
                for hook in hooks {
                    match hook {
                        Hook::Number(number) => info.hook = Some(u32::from(*number)),
                        Hook::Priority(priority) => info.priority = Some(*priority as i32),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(info)
}

/// A reported rule decoded as a redirect, or a description of what it does instead.
pub fn rule_redirect(message: &NetfilterMessage) -> Option<Result<Redirect, String>> {
    let NfTablesMessage::NewRule(rule) = nftables(message)? else {
        return None;
    };
    let in_our_chain = rule
        .attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Table(t) if t == NFT_TABLE))
        && rule
            .attributes
            .iter()
            .any(|a| matches!(a, RuleAttribute::Chain(c) if c == NFT_CHAIN));
    if !in_our_chain {
        return None;
    }
    let expressions = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Expressions(e) => Some(e.as_slice()),
        _ => None,
    });
    Some(decode_redirect(expressions.unwrap_or_default()))
}

fn nftables(message: &NetfilterMessage) -> Option<&NfTablesMessage> {
    match &message.inner {
        netlink_packet_netfilter::NetfilterMessageInner::NfTables(nft) => Some(nft),
        _ => None,
    }
}

/// What a register holds while the rule is read, expression by expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Loaded {
    L4Proto,
    Payload { base: u32, offset: u32, len: u32 },
    Constant(Vec<u8>),
}

/// Reads a rule's expressions the way the kernel runs them and accepts exactly podid's
/// redirect, in any order of its matches; anything else is described in the error.
pub fn decode_redirect(
    expressions: &[ListAttribute<ExpressionAttribute>],
) -> Result<Redirect, String> {
    let mut reader = RuleReader::default();
    for element in expressions {
        let ListAttribute::Element(attributes) = element else {
            return Err("the rule holds a malformed expression".to_owned());
        };
        let name = attributes.iter().find_map(|a| match a {
            ExpressionAttribute::Name(name) => Some(name.as_str()),
            _ => None,
        });
        let data = attributes.iter().find_map(|a| match a {
            ExpressionAttribute::Data(data) => Some(data),
            _ => None,
        });
        match data {
            Some(Expressions::Meta(meta)) => reader.meta(meta)?,
            Some(Expressions::Payload(payload)) => reader.payload(payload)?,
            Some(Expressions::Immediate(immediate)) => reader.immediate(immediate)?,
            Some(Expressions::Cmp(cmp)) => reader.cmp(cmp)?,
            Some(Expressions::Other {
                expression_type,
                attributes,
            }) if expression_type == "redir" => reader.redir(attributes)?,
            _ => {
                return Err(format!(
                    "the rule holds a {} expression",
                    name.unwrap_or("nameless")
                ));
            }
        }
    }
    reader.finish()
}

#[derive(Debug, Default)]
struct RuleReader {
    registers: HashMap<u32, Loaded>,
    l4proto: Option<Vec<u8>>,
    daddr: Option<Ipv4Addr>,
    dport: Option<u16>,
    to_port: Option<u16>,
}

impl RuleReader {
    fn meta(&mut self, meta: &[Meta]) -> Result<(), String> {
        let key = meta.iter().find_map(|m| match m {
            Meta::Key(key) => Some(*key),
            _ => None,
        });
        let dreg = meta.iter().find_map(|m| match m {
            Meta::DestinationRegister(reg) => Some(u32::from(*reg)),
            _ => None,
        });
        match (key, dreg) {
            (Some(MetaKey::L4Proto), Some(reg)) => {
                self.registers.insert(reg, Loaded::L4Proto);
                Ok(())
            }
            _ => Err(format!("the rule matches meta {key:?}")),
        }
    }

    fn payload(&mut self, payload: &[Payload]) -> Result<(), String> {
        let (mut dreg, mut base, mut offset, mut len) = (None, None, None, None);
        for p in payload {
            match p {
                Payload::DestinationRegister(reg) => dreg = Some(u32::from(*reg)),
                Payload::Base(b) => base = Some(*b),
                Payload::Offset(o) => offset = Some(*o),
                Payload::Len(l) => len = Some(*l),
                Payload::SourceRegister(_) => {
                    return Err("the rule rewrites packet payload".to_owned());
                }
                _ => {}
            }
        }
        let (Some(reg), Some(base), Some(offset), Some(len)) = (dreg, base, offset, len) else {
            return Err("the rule holds an incomplete payload expression".to_owned());
        };
        self.registers
            .insert(reg, Loaded::Payload { base, offset, len });
        Ok(())
    }

    fn immediate(&mut self, immediate: &[Immediate]) -> Result<(), String> {
        let dreg = immediate.iter().find_map(|i| match i {
            Immediate::DestinationRegister(reg) => Some(u32::from(*reg)),
            _ => None,
        });
        let value = immediate.iter().find_map(|i| match i {
            Immediate::Data(DataAttribute::Value(v)) => Some(v.clone()),
            _ => None,
        });
        match (dreg, value) {
            (Some(reg), Some(value)) if reg != u32::from(Register::Verdict) => {
                self.registers.insert(reg, Loaded::Constant(value));
                Ok(())
            }
            _ => Err("the rule holds a verdict".to_owned()),
        }
    }

    fn cmp(&mut self, cmp: &[Cmp]) -> Result<(), String> {
        let (mut sreg, mut op, mut value) = (None, None, None);
        for c in cmp {
            match c {
                Cmp::SourceRegister(reg) => sreg = Some(u32::from(*reg)),
                Cmp::Op(o) => op = Some(*o),
                Cmp::Data(DataAttribute::Value(v)) => value = Some(v.clone()),
                _ => {}
            }
        }
        let (Some(reg), Some(Operator::Equal), Some(value)) = (sreg, op, value) else {
            return Err(format!("the rule holds a comparison other than ==: {op:?}"));
        };
        match self.registers.get(&reg) {
            Some(Loaded::L4Proto) => self.l4proto = Some(value),
            Some(Loaded::Payload {
                base: BASE_NETWORK,
                offset: IPV4_DADDR_OFFSET,
                len: 4,
            }) => {
                self.daddr = <[u8; 4]>::try_from(value.as_slice())
                    .ok()
                    .map(Ipv4Addr::from)
            }
            Some(Loaded::Payload {
                base: BASE_TRANSPORT,
                offset: TCP_DPORT_OFFSET,
                len: 2,
            }) => {
                self.dport = <[u8; 2]>::try_from(value.as_slice())
                    .ok()
                    .map(u16::from_be_bytes)
            }
            Some(other) => return Err(format!("the rule matches {other:?}")),
            None => return Err("the rule compares an unset register".to_owned()),
        }
        Ok(())
    }

    fn redir(&mut self, attributes: &[DefaultNla]) -> Result<(), String> {
        let (mut min, mut max) = (None, None);
        for nla in attributes {
            let mut value = vec![0; nla.value_len()];
            nla.emit_value(&mut value);
            let number = <[u8; 4]>::try_from(value.as_slice())
                .ok()
                .map(u32::from_be_bytes);
            match nla.kind() {
                NFTA_REDIR_REG_PROTO_MIN => min = number,
                NFTA_REDIR_REG_PROTO_MAX => max = number,
                NFTA_REDIR_FLAGS
                    if number.is_some_and(|f| f & !NF_NAT_RANGE_PROTO_SPECIFIED == 0) => {}
                _ => return Err("the redirect has options podid does not set".to_owned()),
            }
        }
        let Some(Loaded::Constant(port)) = min.and_then(|reg| self.registers.get(&reg)) else {
            return Err("the redirect has no target port".to_owned());
        };
        if max.is_some_and(|max| Some(max) != min) {
            return Err("the redirect targets a port range".to_owned());
        }
        self.to_port = <[u8; 2]>::try_from(port.as_slice())
            .ok()
            .map(u16::from_be_bytes);
        Ok(())
    }

    fn finish(self) -> Result<Redirect, String> {
        if self.l4proto.as_deref() != Some(&[IPPROTO_TCP][..]) {
            return Err("the rule does not match tcp".to_owned());
        }
        match (self.daddr, self.dport, self.to_port) {
            (Some(daddr), Some(dport), Some(to_port)) => Ok(Redirect {
                daddr,
                dport,
                to_port,
            }),
            (None, _, _) => Err("the rule does not match an IPv4 destination address".to_owned()),
            (_, None, _) => Err("the rule does not match a TCP destination port".to_owned()),
            (_, _, None) => Err("the rule does not redirect".to_owned()),
        }
    }
}

/// What CHECK found in the pod netns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub table: Option<TableInfo>,
    pub chains: Vec<ChainInfo>,
    pub rules: Vec<Result<Redirect, String>>,
}

/// Compares what is installed with what ADD installs; the error says what differs.
pub fn verify(observed: &Observed, container_id: &str, expected: &Redirect) -> Result<(), String> {
    let Some(table) = &observed.table else {
        return Err("table ip podid does not exist".to_owned());
    };
    match table.comment.as_deref() {
        Some(comment) if comment == container_id => {}
        Some(comment) => {
            return Err(format!(
                "table ip podid belongs to container {comment:?}, not {container_id:?}"
            ));
        }
        None => return Err("table ip podid has no container id comment".to_owned()),
    }
    let [chain] = observed.chains.as_slice() else {
        let names: Vec<_> = observed.chains.iter().map(|c| c.name.as_str()).collect();
        return Err(format!(
            "table ip podid must hold exactly chain output, holds {names:?}"
        ));
    };
    let wanted = ChainInfo {
        name: NFT_CHAIN.to_owned(),
        chain_type: Some("nat".to_owned()),
        hook: Some(u32::from(InetHookNumber::LocalOut)),
        priority: Some(PRIORITY_DSTNAT),
        policy: Some(NF_ACCEPT),
    };
    if *chain != wanted {
        return Err(format!("found {chain}, expected {wanted}"));
    }
    match observed.rules.as_slice() {
        [Ok(found)] if found == expected => Ok(()),
        [Ok(found)] => Err(format!("the rule is \"{found}\", expected \"{expected}\"")),
        [Err(what)] => Err(format!("{what}, expected \"{expected}\"")),
        rules => Err(format!(
            "chain output holds {} rules, expected exactly \"{expected}\"",
            rules.len()
        )),
    }
}

fn request(what: &'static str, message: NfTablesMessage, flags: u16) -> Labelled<NetfilterMessage> {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        message,
    ));
    message.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    Labelled { what, message }
}

fn control(message: ControlMessage) -> Labelled<NetfilterMessage> {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, NFNL_SUBSYS_NFTABLES),
        message,
    ));
    message.header.flags = NLM_F_REQUEST;
    Labelled {
        what: "batch",
        message,
    }
}

fn query(message: NfTablesMessage, flags: u16) -> NetlinkMessage<NetfilterMessage> {
    let mut message = NetlinkMessage::from(NetfilterMessage::new(
        NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
        message,
    ));
    message.header.flags = NLM_F_REQUEST | flags;
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, NetlinkBuffer, Parseable};

    fn metadata() -> Redirect {
        Redirect::metadata(Ipv4Addr::new(169, 254, 169, 254), 2579)
    }

    fn bytes(message: &NetlinkMessage<NetfilterMessage>) -> Vec<u8> {
        let mut message = message.clone();
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.emit(&mut buf);
        buf
    }

    /// Every message survives a round trip through its bytes (what the kernel parses).
    fn round_trip(message: &NetlinkMessage<NetfilterMessage>) -> NetlinkMessage<NetfilterMessage> {
        let buf = bytes(message);
        NetlinkMessage::parse(&NetlinkBuffer::new(&buf)).unwrap()
    }

    #[test]
    fn comment_tlv_is_nfts() {
        assert_eq!(comment_userdata("ab"), [0, 3, b'a', b'b', 0]);
        assert_eq!(
            comment_of(&comment_userdata("0123abcd")).as_deref(),
            Some("0123abcd")
        );
        // Another TLV first, as a table carrying flags userdata would have.
        assert_eq!(
            comment_of(&[1, 2, 9, 9, 0, 2, b'x', 0]).as_deref(),
            Some("x")
        );
        assert_eq!(comment_of(&[0, 5, b'x', 0]), None);
        assert_eq!(comment_of(&[0, 1, b'x']), None);
        assert_eq!(comment_of(&[]), None);
        let long = "a".repeat(234);
        assert_eq!(
            comment_of(&comment_userdata(&long)).as_deref(),
            Some(long.as_str())
        );
    }

    #[test]
    fn batch_shape() {
        let batch = install_batch("cid1", &metadata(), Install::Replace);
        let types: Vec<u16> = batch
            .iter()
            .map(|l| {
                let mut m = l.message.clone();
                m.finalize();
                m.header.message_type
            })
            .collect();
        // NFNL_MSG_BATCH_BEGIN, NEWTABLE, DELTABLE, NEWTABLE, NEWCHAIN, NEWRULE, NFNL_MSG_BATCH_END.
        assert_eq!(types, [0x10, 0x0a00, 0x0a02, 0x0a00, 0x0a03, 0x0a06, 0x11]);
        let flags: Vec<u16> = batch.iter().map(|l| l.message.header.flags).collect();
        assert_eq!(
            flags,
            [
                NLM_F_REQUEST,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                NLM_F_REQUEST | NLM_F_ACK,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND,
                NLM_F_REQUEST,
            ]
        );
        for labelled in &batch {
            let mut expected = labelled.message.clone();
            expected.finalize();
            assert_eq!(round_trip(&labelled.message), expected);
        }
    }

    #[test]
    fn fresh_batch_deletes_nothing() {
        let batch = install_batch("cid1", &metadata(), Install::Fresh);
        let types: Vec<u16> = batch
            .iter()
            .map(|l| {
                let mut m = l.message.clone();
                m.finalize();
                m.header.message_type
            })
            .collect();
        // NFNL_MSG_BATCH_BEGIN, NEWTABLE, NEWCHAIN, NEWRULE, NFNL_MSG_BATCH_END.
        assert_eq!(types, [0x10, 0x0a00, 0x0a03, 0x0a06, 0x11]);
        assert_eq!(
            batch[1].message.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }

    #[test]
    fn batch_begin_golden_bytes() {
        // As captured from `nft -f` (netlink-packet-netfilter's own test vectors), seq 0.
        let begin = &install_batch("c", &metadata(), Install::Replace)[0].message;
        assert_eq!(
            bytes(begin),
            [
                0x14, 0x00, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                0x00, 0x00, 0x00, 0x00, 0x00, 0x0a
            ]
        );
    }

    #[test]
    fn table_with_comment_golden_bytes() {
        let table = &install_batch("ab", &metadata(), Install::Replace)[3].message;
        let expected = vec![
            0x2c, 0x00, 0x00, 0x00, // length 44
            0x00, 0x0a, // NFT_MSG_NEWTABLE | NFNL_SUBSYS_NFTABLES << 8
            0x05, 0x04, // NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq, port
            0x02, 0x00, 0x00, 0x00, // nfgenmsg: NFPROTO_IPV4, version 0, res_id 0
            0x0a, 0x00, 0x01, 0x00, b'p', b'o', b'd', b'i', b'd', 0x00, 0x00,
            0x00, // NFTA_TABLE_NAME
            0x09, 0x00, 0x06, 0x00, 0x00, 0x03, b'a', b'b', 0x00, 0x00, 0x00,
            0x00, // NFTA_TABLE_USERDATA
        ];
        assert_eq!(bytes(table), expected);
    }

    #[test]
    fn chain_is_nat_output_dstnat() {
        let batch = install_batch("c", &metadata(), Install::Replace);
        let info = chain_info(match &round_trip(&batch[4].message).payload {
            netlink_packet_core::NetlinkPayload::InnerMessage(m) => m,
            other => panic!("{other:?}"),
        })
        .unwrap();
        assert_eq!(
            info,
            ChainInfo {
                name: "output".into(),
                chain_type: Some("nat".into()),
                hook: Some(3),
                priority: Some(-100),
                policy: Some(1),
            }
        );
    }

    #[test]
    fn rule_decodes_back_to_the_redirect() {
        let batch = install_batch("c", &metadata(), Install::Replace);
        let NfTablesMessage::NewRule(rule) =
            nftables(match &round_trip(&batch[5].message).payload {
                netlink_packet_core::NetlinkPayload::InnerMessage(m) => m,
                other => panic!("{other:?}"),
            })
            .unwrap()
            .clone()
        else {
            panic!("not a rule")
        };
        let RuleAttribute::Expressions(expressions) = &rule.attributes[2] else {
            panic!("no expressions")
        };
        assert_eq!(decode_redirect(expressions), Ok(metadata()));
    }

    #[test]
    fn redir_expression_uses_register_1() {
        let expressions = redirect_expressions(&metadata());
        let ListAttribute::Element(last) = expressions.last().unwrap() else {
            panic!()
        };
        assert_eq!(last[0], ExpressionAttribute::Name("redir".into()));
        let ExpressionAttribute::Data(Expressions::Other { attributes, .. }) = &last[1] else {
            panic!()
        };
        assert_eq!(attributes, &[DefaultNla::new(1, vec![0, 0, 0, 1])]);
    }

    #[test]
    fn decode_rejects_other_rules() {
        let mut wrong_port = redirect_expressions(&metadata());
        wrong_port.remove(5);
        assert!(decode_redirect(&wrong_port).unwrap_err().contains("port"));
        let mut no_tcp = redirect_expressions(&metadata());
        no_tcp.drain(0..2);
        assert!(decode_redirect(&no_tcp).unwrap_err().contains("tcp"));
        let mut verdict = redirect_expressions(&metadata());
        verdict[6] =
            Expressions::Immediate(vec![Immediate::DestinationRegister(Register::Verdict)]).into();
        assert!(decode_redirect(&verdict).is_err());
        assert!(decode_redirect(&[]).is_err());
        let other = Redirect::metadata(Ipv4Addr::new(10, 0, 0, 1), 9);
        assert_eq!(decode_redirect(&redirect_expressions(&other)), Ok(other));
    }

    fn observed(comment: &str, rules: Vec<Result<Redirect, String>>) -> Observed {
        Observed {
            table: Some(TableInfo {
                handle: Some(7),
                comment: Some(comment.into()),
            }),
            chains: vec![ChainInfo {
                name: "output".into(),
                chain_type: Some("nat".into()),
                hook: Some(3),
                priority: Some(-100),
                policy: Some(1),
            }],
            rules,
        }
    }

    #[test]
    fn verify_names_what_differs() {
        let expected = metadata();
        assert_eq!(
            verify(&observed("c", vec![Ok(expected)]), "c", &expected),
            Ok(())
        );
        let cases = [
            (Observed::default(), "does not exist"),
            (
                observed("other", vec![Ok(expected)]),
                "belongs to container \"other\"",
            ),
            (observed("c", vec![]), "0 rules"),
            (observed("c", vec![Ok(expected), Ok(expected)]), "2 rules"),
            (
                observed(
                    "c",
                    vec![Ok(Redirect {
                        to_port: 1,
                        ..expected
                    })],
                ),
                "redirect to :1\", expected",
            ),
            (
                observed("c", vec![Err("the rule holds a verdict".into())]),
                "verdict",
            ),
        ];
        for (observed, needle) in cases {
            let err = verify(&observed, "c", &expected).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
        let mut low_priority = observed("c", vec![Ok(expected)]);
        low_priority.chains[0].priority = Some(0);
        assert!(
            verify(&low_priority, "c", &expected)
                .unwrap_err()
                .contains("priority 0")
        );
        let mut extra = observed("c", vec![Ok(expected)]);
        extra.chains.push(ChainInfo {
            name: "sneaky".into(),
            ..ChainInfo::default()
        });
        assert!(
            verify(&extra, "c", &expected)
                .unwrap_err()
                .contains("sneaky")
        );
    }
}
