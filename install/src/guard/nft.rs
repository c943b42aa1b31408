//! The host guard's nf_tables messages, and the reading of what the kernel reports back.
//! Pure: no socket here.
//!
//! ```text
//! table ip podid-guard {
//!   comment "podid host guard: pods never reach the node's IMDS; kept on exit"
//!   chain forward {
//!     type filter hook forward priority filter - 10; policy accept;
//!     ip daddr 169.254.169.254 counter drop
//!   }
//! }
//! ```
//!
//! Family `ip`: the metadata address is IPv4 only, so the IPv4 forward hook sees every packet
//! that could reach it, and the rule needs no `meta nfproto` match as an `inet` table's would.
//! The drop is final whichever base chain meets the packet first, so other tables' accepts
//! (kube-proxy, Azure CNI) cannot undo it; the priority only makes it run early.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage,
};
use netlink_packet_netfilter::nftables::{
    ChainAttribute, ChainMessage, Cmp, DataAttribute, ExpressionAttribute, Expressions, Hook,
    HookNumber, Immediate, InetHookNumber, ListAttribute, NfTablesMessage, Operator, Payload,
    Register, RuleAttribute, RuleMessage, TableAttribute, TableFlags, TableMessage, Verdict,
    VerdictAttribute,
};
use netlink_packet_netfilter::none::ControlMessage;
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};

use super::netlink::Labelled;

/// The guard table, in family `ip`.
pub const TABLE: &str = "podid-guard";
/// Its one chain.
pub const CHAIN: &str = "forward";
/// The table's comment: what it is and that it stays.
pub const COMMENT: &str = "podid host guard: pods never reach the node's IMDS; kept on exit";
/// nft's `filter - 10`: ahead of the usual filter chains.
pub const PRIORITY: i32 = -10;
/// The address nothing forwarded may reach.
pub const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// `NFNL_SUBSYS_NFTABLES`: the batch begin/end messages carry it as their resource id.
const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// `NFTNL_UDATA_TABLE_COMMENT`: the TLV type under which nft keeps a table's comment.
const UDATA_TABLE_COMMENT: u8 = 0;
/// `NF_DROP` and `NF_ACCEPT` verdict codes.
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
/// `NFT_PAYLOAD_NETWORK_HEADER`, and where the destination address sits in the IPv4 header.
const BASE_NETWORK: u32 = 1;
const IPV4_DADDR_OFFSET: u32 = 16;
/// The register the rule compares in.
const REG: Register = Register::Reg1;

/// How the batch treats an existing `ip podid-guard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// No table: create it exclusively, deleting nothing.
    Fresh,
    /// A wrong table: create-if-absent, delete, create again, all in one transaction, so the
    /// node is never without a guard.
    Replace,
}

/// The one atomic batch that installs the guard.
pub fn install_batch(mode: Install) -> Vec<Labelled<NetfilterMessage>> {
    let tagged_table = |flags| {
        request(
            "creating table ip podid-guard with its comment",
            NfTablesMessage::NewTable(TableMessage {
                attributes: vec![
                    TableAttribute::Name(TABLE.to_owned()),
                    TableAttribute::UserData(comment_userdata(COMMENT)),
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
                "creating table ip podid-guard",
                NfTablesMessage::NewTable(TableMessage {
                    attributes: vec![TableAttribute::Name(TABLE.to_owned())],
                }),
                NLM_F_CREATE,
            ),
            request(
                "deleting the wrong table ip podid-guard",
                NfTablesMessage::DeleteTable(TableMessage {
                    attributes: vec![TableAttribute::Name(TABLE.to_owned())],
                }),
                0,
            ),
            tagged_table(NLM_F_CREATE),
        ]),
    }
    batch.extend([
        request(
            "creating chain forward",
            NfTablesMessage::NewChain(ChainMessage {
                attributes: vec![
                    ChainAttribute::Table(TABLE.to_owned()),
                    ChainAttribute::Name(CHAIN.to_owned()),
                    ChainAttribute::Hook(vec![
                        Hook::Number(HookNumber::Inet(InetHookNumber::Forward)),
                        Hook::Priority(PRIORITY as u32),
                    ]),
                    ChainAttribute::Policy(NF_ACCEPT),
                    ChainAttribute::Type("filter".to_owned()),
                ],
            }),
            NLM_F_CREATE,
        ),
        request(
            "adding the drop rule",
            NfTablesMessage::NewRule(RuleMessage {
                attributes: vec![
                    RuleAttribute::Table(TABLE.to_owned()),
                    RuleAttribute::Chain(CHAIN.to_owned()),
                    RuleAttribute::Expressions(drop_expressions()),
                ],
            }),
            NLM_F_CREATE | NLM_F_APPEND,
        ),
        control(ControlMessage::BatchEnd),
    ]);
    batch
}

/// `ip daddr 169.254.169.254 counter drop`.
pub fn drop_expressions() -> Vec<ListAttribute<ExpressionAttribute>> {
    vec![
        Expressions::Payload(vec![
            Payload::DestinationRegister(REG),
            Payload::Base(BASE_NETWORK),
            Payload::Offset(IPV4_DADDR_OFFSET),
            Payload::Len(4),
        ])
        .into(),
        Expressions::Cmp(vec![
            Cmp::SourceRegister(REG),
            Cmp::Op(Operator::Equal),
            Cmp::Data(DataAttribute::Value(METADATA.octets().to_vec())),
        ])
        .into(),
        Expressions::Other {
            expression_type: "counter".to_owned(),
            attributes: Vec::new(),
        }
        .into(),
        Expressions::Immediate(vec![
            Immediate::DestinationRegister(Register::Verdict),
            Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                Verdict::Other(NF_DROP),
            )])),
        ])
        .into(),
    ]
}

/// `NFT_MSG_GETTABLE` for `ip podid-guard`.
pub fn get_table() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetTable(TableMessage {
            attributes: vec![TableAttribute::Name(TABLE.to_owned())],
        }),
        0,
    )
}

/// A dump of the chains of `ip podid-guard`.
pub fn dump_chains() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetChain(ChainMessage {
            attributes: vec![ChainAttribute::Table(TABLE.to_owned())],
        }),
        NLM_F_DUMP,
    )
}

/// A dump of the rules of `ip podid-guard` (every chain).
pub fn dump_rules() -> NetlinkMessage<NetfilterMessage> {
    query(
        NfTablesMessage::GetRule(RuleMessage {
            attributes: vec![RuleAttribute::Table(TABLE.to_owned())],
        }),
        NLM_F_DUMP,
    )
}

/// nft's table comment: one TLV, type `NFTNL_UDATA_TABLE_COMMENT`, the text and its NUL.
pub fn comment_userdata(comment: &str) -> Vec<u8> {
    let mut value = comment.as_bytes().to_vec();
    value.push(0);
    // The comment is a constant well under nft's 128-byte limit: the length fits a byte.
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

/// The table as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableInfo {
    pub comment: Option<String>,
    pub dormant: bool,
}

/// A chain of the table as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChainInfo {
    pub name: String,
    pub chain_type: Option<String>,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<u32>,
}

impl ChainInfo {
    fn wanted() -> Self {
        Self {
            name: CHAIN.to_owned(),
            chain_type: Some("filter".to_owned()),
            hook: Some(u32::from(InetHookNumber::Forward)),
            priority: Some(PRIORITY),
            policy: Some(NF_ACCEPT),
        }
    }
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

/// A rule of the table: in which chain, and whether it is the guard's drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub drop: Result<(), String>,
}

/// Everything of `ip podid-guard` that matters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub table: Option<TableInfo>,
    pub chains: Vec<ChainInfo>,
    pub rules: Vec<RuleInfo>,
}

/// Compares what is installed with the guard; the error says what differs.
pub fn verify(observed: &Observed) -> Result<(), String> {
    let Some(table) = &observed.table else {
        return Err("table ip podid-guard does not exist".to_owned());
    };
    if table.comment.as_deref() != Some(COMMENT) {
        return Err(format!(
            "table ip podid-guard has comment {:?}, not the guard's",
            table.comment
        ));
    }
    if table.dormant {
        return Err("table ip podid-guard is dormant".to_owned());
    }
    let wanted = ChainInfo::wanted();
    match observed.chains.as_slice() {
        [chain] if *chain == wanted => {}
        [chain] => return Err(format!("found {chain}, expected {wanted}")),
        chains => {
            let names: Vec<_> = chains.iter().map(|c| c.name.as_str()).collect();
            return Err(format!(
                "table ip podid-guard must hold exactly chain forward, holds {names:?}"
            ));
        }
    }
    match observed.rules.as_slice() {
        [rule] if rule.chain == CHAIN => rule
            .drop
            .clone()
            .map_err(|why| format!("{why}, expected \"ip daddr {METADATA} counter drop\"")),
        rules => Err(format!(
            "table ip podid-guard holds {} rules, expected exactly \"ip daddr {METADATA} counter drop\"",
            rules.len()
        )),
    }
}

pub fn table_info(message: &NetfilterMessage) -> Option<TableInfo> {
    let NfTablesMessage::NewTable(table) = nftables(message)? else {
        return None;
    };
    let named = table
        .attributes
        .iter()
        .any(|a| matches!(a, TableAttribute::Name(n) if n == TABLE));
    if !named {
        return None;
    }
    let mut info = TableInfo::default();
    for attribute in &table.attributes {
        match attribute {
            TableAttribute::UserData(data) => info.comment = comment_of(data),
            TableAttribute::Flags(flags) => info.dormant = flags.contains(TableFlags::Dormant),
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
        .any(|a| matches!(a, ChainAttribute::Table(t) if t == TABLE));
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

pub fn rule_info(message: &NetfilterMessage) -> Option<RuleInfo> {
    let NfTablesMessage::NewRule(rule) = nftables(message)? else {
        return None;
    };
    let ours = rule
        .attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Table(t) if t == TABLE));
    if !ours {
        return None;
    }
    let chain = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Chain(c) => Some(c.clone()),
        _ => None,
    });
    let expressions = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::Expressions(e) => Some(e.as_slice()),
        _ => None,
    });
    Some(RuleInfo {
        chain: chain.unwrap_or_default(),
        drop: decode_drop(expressions.unwrap_or_default()),
    })
}

fn nftables(message: &NetfilterMessage) -> Option<&NfTablesMessage> {
    match &message.inner {
        NetfilterMessageInner::NfTables(nft) => Some(nft),
        _ => None,
    }
}

/// Reads a rule the way the kernel runs it and accepts exactly `ip daddr 169.254.169.254
/// [counter] drop`; anything else is described in the error.
pub fn decode_drop(expressions: &[ListAttribute<ExpressionAttribute>]) -> Result<(), String> {
    let mut loaded: HashMap<u32, (u32, u32, u32)> = HashMap::new();
    let mut matched = false;
    let mut verdict = None;
    for element in expressions {
        let ListAttribute::Element(attributes) = element else {
            return Err("the rule holds a malformed expression".to_owned());
        };
        if verdict.is_some() {
            return Err("the rule goes on after its verdict".to_owned());
        }
        let name = attributes.iter().find_map(|a| match a {
            ExpressionAttribute::Name(name) => Some(name.as_str()),
            _ => None,
        });
        let data = attributes.iter().find_map(|a| match a {
            ExpressionAttribute::Data(data) => Some(data),
            _ => None,
        });
        match data {
            Some(Expressions::Payload(payload)) => {
                let (mut dreg, mut base, mut offset, mut len) = (None, None, None, None);
                for p in payload {
                    match p {
                        Payload::DestinationRegister(reg) => dreg = Some(u32::from(*reg)),
                        Payload::Base(b) => base = Some(*b),
                        Payload::Offset(o) => offset = Some(*o),
                        Payload::Len(l) => len = Some(*l),
                        _ => return Err("the rule rewrites packet payload".to_owned()),
                    }
                }
                let (Some(reg), Some(base), Some(offset), Some(len)) = (dreg, base, offset, len)
                else {
                    return Err("the rule holds an incomplete payload expression".to_owned());
                };
                loaded.insert(reg, (base, offset, len));
            }
            Some(Expressions::Cmp(cmp)) => {
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
                if loaded.get(&reg) != Some(&(BASE_NETWORK, IPV4_DADDR_OFFSET, 4)) {
                    return Err("the rule matches something other than ip daddr".to_owned());
                }
                if value != METADATA.octets() {
                    return Err(format!("the rule matches ip daddr {value:?}"));
                }
                matched = true;
            }
            Some(Expressions::Other {
                expression_type, ..
            }) if expression_type == "counter" => {}
            Some(Expressions::Immediate(immediate)) => {
                let to_verdict = immediate.iter().any(|i| {
                    matches!(i, Immediate::DestinationRegister(r) if u32::from(*r) == u32::from(Register::Verdict))
                });
                let code = immediate.iter().find_map(|i| match i {
                    Immediate::Data(DataAttribute::Verdict(v)) => v.iter().find_map(|a| match a {
                        VerdictAttribute::Code(code) => Some(u32::from(*code)),
                        _ => None,
                    }),
                    _ => None,
                });
                match (to_verdict, code) {
                    (true, Some(code)) => verdict = Some(code),
                    _ => return Err("the rule loads data other than a verdict".to_owned()),
                }
            }
            _ => {
                return Err(format!(
                    "the rule holds a {} expression",
                    name.unwrap_or("nameless")
                ));
            }
        }
    }
    match (matched, verdict) {
        (true, Some(NF_DROP)) => Ok(()),
        (false, _) => Err(format!("the rule does not match ip daddr {METADATA}")),
        (true, Some(code)) => Err(format!("the rule's verdict is {code}, not drop")),
        (true, None) => Err("the rule has no verdict".to_owned()),
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
    use netlink_packet_core::{DefaultNla, Emitable, NetlinkBuffer, NetlinkPayload, Parseable};

    /// A counter's value as the kernel reports it.
    fn counter_nla(kind: u16, value: u64) -> DefaultNla {
        DefaultNla::new(kind, value.to_be_bytes().to_vec())
    }

    fn round_trip(message: &NetlinkMessage<NetfilterMessage>) -> NetfilterMessage {
        let mut message = message.clone();
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.emit(&mut buf);
        match NetlinkMessage::<NetfilterMessage>::parse(&NetlinkBuffer::new(&buf))
            .unwrap()
            .payload
        {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn types(batch: &[Labelled<NetfilterMessage>]) -> Vec<u16> {
        batch
            .iter()
            .map(|l| {
                let mut m = l.message.clone();
                m.finalize();
                m.header.message_type
            })
            .collect()
    }

    #[test]
    fn batches() {
        // BATCH_BEGIN, NEWTABLE, NEWCHAIN, NEWRULE, BATCH_END
        assert_eq!(
            types(&install_batch(Install::Fresh)),
            [0x10, 0x0a00, 0x0a03, 0x0a06, 0x11]
        );
        // BATCH_BEGIN, NEWTABLE, DELTABLE, NEWTABLE, NEWCHAIN, NEWRULE, BATCH_END
        let replace = install_batch(Install::Replace);
        assert_eq!(
            types(&replace),
            [0x10, 0x0a00, 0x0a02, 0x0a00, 0x0a03, 0x0a06, 0x11]
        );
        assert_eq!(
            install_batch(Install::Fresh)[1].message.header.flags,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
    }

    #[test]
    fn what_is_sent_reads_back_as_the_guard() {
        let batch = install_batch(Install::Replace);
        let table = table_info(&round_trip(&batch[3].message)).unwrap();
        let chain = chain_info(&round_trip(&batch[4].message)).unwrap();
        let rule = rule_info(&round_trip(&batch[5].message)).unwrap();
        let observed = Observed {
            table: Some(table),
            chains: vec![chain],
            rules: vec![rule],
        };
        assert_eq!(verify(&observed), Ok(()));
        assert!(COMMENT.len() < 128, "nft's comment limit");
    }

    #[test]
    fn a_counter_with_values_is_still_the_guard() {
        let mut expressions = drop_expressions();
        expressions[2] = Expressions::Other {
            expression_type: "counter".to_owned(),
            attributes: vec![counter_nla(1, 420), counter_nla(2, 7)],
        }
        .into();
        assert_eq!(decode_drop(&expressions), Ok(()));
        // nft without counter
        let mut plain = drop_expressions();
        plain.remove(2);
        assert_eq!(decode_drop(&plain), Ok(()));
    }

    fn observed() -> Observed {
        Observed {
            table: Some(TableInfo {
                comment: Some(COMMENT.to_owned()),
                dormant: false,
            }),
            chains: vec![ChainInfo::wanted()],
            rules: vec![RuleInfo {
                chain: CHAIN.to_owned(),
                drop: Ok(()),
            }],
        }
    }

    #[test]
    fn verify_names_what_differs() {
        assert_eq!(verify(&observed()), Ok(()));
        let mut cases: Vec<(Observed, &str)> = vec![(Observed::default(), "does not exist")];
        let mut o = observed();
        o.table = Some(TableInfo {
            comment: None,
            dormant: false,
        });
        cases.push((o, "comment None"));
        let mut o = observed();
        o.table.as_mut().unwrap().dormant = true;
        cases.push((o, "dormant"));
        let mut o = observed();
        o.chains[0].policy = Some(NF_DROP);
        cases.push((o, "policy 0"));
        let mut o = observed();
        o.chains[0].hook = Some(u32::from(InetHookNumber::LocalIn));
        cases.push((o, "hook 1"));
        let mut o = observed();
        o.chains.push(ChainInfo {
            name: "sneaky".into(),
            ..ChainInfo::default()
        });
        cases.push((o, "sneaky"));
        let mut o = observed();
        o.rules.clear();
        cases.push((o, "0 rules"));
        let mut o = observed();
        o.rules[0].drop = Err("the rule's verdict is 1, not drop".into());
        cases.push((o, "not drop"));
        for (observed, needle) in cases {
            let err = verify(&observed).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn decode_rejects_other_rules() {
        let accept = {
            let mut e = drop_expressions();
            e[3] = Expressions::Immediate(vec![
                Immediate::DestinationRegister(Register::Verdict),
                Immediate::Data(DataAttribute::Verdict(vec![VerdictAttribute::Code(
                    Verdict::Other(NF_ACCEPT),
                )])),
            ])
            .into();
            e
        };
        assert!(decode_drop(&accept).unwrap_err().contains("not drop"));
        let other_address = {
            let mut e = drop_expressions();
            e[1] = Expressions::Cmp(vec![
                Cmp::SourceRegister(REG),
                Cmp::Op(Operator::Equal),
                Cmp::Data(DataAttribute::Value(vec![10, 0, 0, 1])),
            ])
            .into();
            e
        };
        assert!(
            decode_drop(&other_address)
                .unwrap_err()
                .contains("[10, 0, 0, 1]")
        );
        let saddr = {
            let mut e = drop_expressions();
            e[0] = Expressions::Payload(vec![
                Payload::DestinationRegister(REG),
                Payload::Base(BASE_NETWORK),
                Payload::Offset(12),
                Payload::Len(4),
            ])
            .into();
            e
        };
        assert!(
            decode_drop(&saddr)
                .unwrap_err()
                .contains("other than ip daddr")
        );
        assert!(
            decode_drop(&drop_expressions()[..2])
                .unwrap_err()
                .contains("no verdict")
        );
        assert!(
            decode_drop(&drop_expressions()[2..])
                .unwrap_err()
                .contains("does not match")
        );
        assert!(decode_drop(&[]).is_err());
    }

    #[test]
    fn comments() {
        assert_eq!(comment_userdata("ab"), [0, 3, b'a', b'b', 0]);
        assert_eq!(
            comment_of(&comment_userdata(COMMENT)).as_deref(),
            Some(COMMENT)
        );
        assert_eq!(
            comment_of(&[1, 2, 9, 9, 0, 2, b'x', 0]).as_deref(),
            Some("x")
        );
        assert_eq!(comment_of(&[0, 5, b'x', 0]), None);
    }
}
