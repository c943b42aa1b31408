//! The host guard in the node netns (DESIGN.md "Host guard"): table `ip podid-guard` drops
//! forwarded traffic to 169.254.169.254, so a pod that deleted its own `podid` table still
//! cannot reach the node's IMDS, while the node's own processes (tokend) reach it on the output
//! path, which the guard does not touch. Installed in one atomic batch, put back whenever it is
//! missing or differs, and never removed by podid-install: not on exit, not on `--uninstall`.

pub mod netlink;
pub mod nft;

use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::Duration;

use tracing::warn;

use self::netlink::{Conn, NetlinkError, Notifications};
use self::nft::{Install, Observed};

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("nftables: {0}")]
    Nftables(#[from] NetlinkError),
    #[error("the guard was installed but reads back wrong: {0}")]
    ReadsBackWrong(String),
}

/// What a reconcile found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardAction {
    /// The guard is there as it should be.
    InPlace,
    /// It was missing or wrong (why) and has been installed.
    Installed { why: String },
}

/// Makes table `ip podid-guard` in this thread's netns exactly the guard.
pub fn reconcile() -> Result<GuardAction, GuardError> {
    let mut conn = Conn::open()?;
    let observed = observe(&mut conn)?;
    let Err(why) = nft::verify(&observed) else {
        return Ok(GuardAction::InPlace);
    };
    let fresh = observed.table.is_none();
    let installed = if fresh {
        match conn.transact(nft::install_batch(Install::Fresh)) {
            // Someone created the table meanwhile: replace it instead.
            Err(e) if e.errno() == Some(libc::EEXIST) => {
                conn.transact(nft::install_batch(Install::Replace))
            }
            done => done,
        }
    } else {
        conn.transact(nft::install_batch(Install::Replace))
    };
    installed?;
    nft::verify(&observe(&mut conn)?).map_err(GuardError::ReadsBackWrong)?;
    Ok(GuardAction::Installed { why })
}

/// Table `ip podid-guard`, its chains and its rules, as the kernel reports them.
pub fn observe(conn: &mut Conn) -> Result<Observed, NetlinkError> {
    let table = match conn.query("reading table ip podid-guard", nft::get_table()) {
        Ok(answers) => answers.iter().find_map(nft::table_info),
        Err(e) if e.errno() == Some(libc::ENOENT) => None,
        Err(e) => return Err(e),
    };
    if table.is_none() {
        return Ok(Observed::default());
    }
    let dump = |conn: &mut Conn, what, message| match conn.query(what, message) {
        Ok(answers) => Ok(answers),
        // The table went away between the two reads.
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    let chains = dump(
        conn,
        "listing the chains of ip podid-guard",
        nft::dump_chains(),
    )?
    .iter()
    .filter_map(nft::chain_info)
    .collect();
    let rules = dump(
        conn,
        "listing the rules of ip podid-guard",
        nft::dump_rules(),
    )?
    .iter()
    .filter_map(nft::rule_info)
    .collect();
    Ok(Observed {
        table,
        chains,
        rules,
    })
}

/// Why the guard keeper wakes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardWake {
    /// The ruleset changed somewhere in the netns.
    Changed,
    Stop,
}

/// Forwards nf_tables change notifications of this netns to `wake` from a thread of its own
/// (at most one queued: a burst of changes needs one look). Without notifications the keeper
/// still reconciles on its timer.
pub fn spawn_notifier(wake: SyncSender<GuardWake>) {
    let started = std::thread::Builder::new()
        .name("podid-install-nft-events".into())
        .spawn(move || {
            let notifications = match Notifications::subscribe() {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, "cannot subscribe to nftables changes; the guard is checked on its timer only");
                    return;
                }
            };
            loop {
                if let Err(e) = notifications.wait() {
                    warn!(error = %e, "nftables change notifications failed; the guard is checked on its timer only");
                    return;
                }
                match wake.try_send(GuardWake::Changed) {
                    Ok(()) | Err(TrySendError::Full(_)) => {}
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        });
    if let Err(e) = started {
        warn!(error = %e, "cannot start the nftables notification thread; the guard is checked on its timer only");
    }
}

/// Waits for the next reason to look at the guard: a change, the timer, or stop.
pub fn next_wake(wake: &Receiver<GuardWake>, timeout: Duration) -> GuardWake {
    match wake.recv_timeout(timeout) {
        Ok(GuardWake::Stop) | Err(RecvTimeoutError::Disconnected) => GuardWake::Stop,
        Ok(GuardWake::Changed) | Err(RecvTimeoutError::Timeout) => GuardWake::Changed,
    }
}
