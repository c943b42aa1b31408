//! The redirect in the pod netns, over netlink: install it, read it back, remove it. Every
//! function here runs on the thread that `netns::run_in` moved into the pod netns.

use netlink_sys::protocols::NETLINK_NETFILTER;

use crate::link::{self, Loopback};
use crate::netlink::{Conn, NetlinkError};
use crate::nft::{self, Install, Observed, Redirect};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("loopback: {0}")]
    Loopback(NetlinkError),
    #[error("nftables: {0}")]
    Nftables(NetlinkError),
}

/// ADD's first work in the pod netns: `lo` up, before tokend binds `127.0.0.1` there (a fresh
/// netns has no `127.0.0.1` until `lo` comes up, so the bind would fail).
pub fn loopback_up() -> Result<Loopback, SetupError> {
    link::ensure_loopback_up().map_err(SetupError::Loopback)
}

/// ADD's last work in the pod netns: the one atomic batch. A pod's first ADD finds no table and
/// creates it without deleting anything; a retried ADD replaces the table it finds.
pub fn install(container_id: &str, redirect: &Redirect) -> Result<(), SetupError> {
    let mut conn = Conn::open(NETLINK_NETFILTER).map_err(SetupError::Nftables)?;
    if get_table(&mut conn)
        .map_err(SetupError::Nftables)?
        .is_none()
    {
        match conn.transact(nft::install_batch(container_id, redirect, Install::Fresh)) {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            done => return done.map_err(SetupError::Nftables),
        }
    }
    conn.transact(nft::install_batch(container_id, redirect, Install::Replace))
        .map_err(SetupError::Nftables)
}

/// CHECK's view of table `ip podid`: the table, its chains, and the rules of chain `output`.
pub fn observe() -> Result<Observed, NetlinkError> {
    let mut conn = Conn::open(NETLINK_NETFILTER)?;
    let Some(table) = get_table(&mut conn)? else {
        return Ok(Observed::default());
    };
    let chains = conn
        .query("listing the chains of table ip podid", nft::dump_chains())?
        .iter()
        .filter_map(nft::chain_info)
        .collect();
    let rules = match conn.query("listing the rules of chain output", nft::dump_rules()) {
        Ok(rules) => rules.iter().filter_map(nft::rule_redirect).collect(),
        Err(e) if e.errno() == Some(libc::ENOENT) => Vec::new(),
        Err(e) => return Err(e),
    };
    Ok(Observed {
        table: Some(table),
        chains,
        rules,
    })
}

/// What DEL did to table `ip podid`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// There was no table (never installed, or already removed).
    Absent,
    Removed,
    /// The table is tagged with another container id (or none): left alone.
    NotOurs(Option<String>),
}

/// Deletes table `ip podid` only if its comment is `container_id`, by handle, so the table
/// deleted is exactly the one inspected.
pub fn remove_if_owned(container_id: &str) -> Result<Removal, NetlinkError> {
    let mut conn = Conn::open(NETLINK_NETFILTER)?;
    let Some(table) = get_table(&mut conn)? else {
        return Ok(Removal::Absent);
    };
    if table.comment.as_deref() != Some(container_id) {
        return Ok(Removal::NotOurs(table.comment));
    }
    let handle = table.handle.ok_or_else(|| {
        NetlinkError::Unexpected("the kernel reported table ip podid without a handle".to_owned())
    })?;
    match conn.transact(nft::delete_batch(handle)) {
        Ok(()) => Ok(Removal::Removed),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(Removal::Absent),
        Err(e) => Err(e),
    }
}

fn get_table(conn: &mut Conn) -> Result<Option<nft::TableInfo>, NetlinkError> {
    match conn.query("reading table ip podid", nft::get_table()) {
        Ok(answers) => Ok(answers.iter().find_map(nft::table_info)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}
