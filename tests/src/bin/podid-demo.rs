//! `podid-demo`: the local one-node demo that `./demo.sh` runs (see `podid_tests::demo`).
//! Needs root. Exits 0 when the pod got rgapi's token and the second pod got none, 130 when
//! interrupted (SIGINT or SIGTERM), 1 on failure; every time after removing what it created.

use std::io::Write;
use std::process::ExitCode;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podid_tests::demo::{self, Cancel, Progress};
use tokio::signal::unix::{SignalKind, signal};

fn main() -> ExitCode {
    // Handlers, not a blocked mask: a mask would be inherited by every process the demo starts
    // (the daemons would then ignore the SIGTERM that stops them).
    let cancel = Cancel::default();
    let signals = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            let streams = rt.block_on(async {
                Ok::<_, std::io::Error>((
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::terminate())?,
                ))
            })?;
            Ok((rt, streams))
        });
    match signals {
        Ok((rt, (int, term))) => {
            let cancel = cancel.clone();
            std::thread::spawn(move || rt.block_on(wait_for_signals(int, term, &cancel)));
        }
        Err(e) => {
            eprintln!("podid-demo: installing the SIGINT/SIGTERM handlers: {e}");
            return ExitCode::FAILURE;
        }
    }

    let mut progress = Progress::new(std::io::stdout(), &cancel);
    let mut node_dir = None;
    let result = demo::run(&cancel, &mut progress, &mut node_dir);
    let left = demo::leftovers(node_dir.as_deref());
    let total = demo::seconds(progress.elapsed());
    let code = match &result {
        Ok(report) => {
            progress.line("");
            progress.line(demo::SUMMARY);
            progress.line("");
            progress.line(format_args!(
                "Done in {total}: pod rgapi/rgapi got a token for client id {}; pod rgapi/{} got no token{}.",
                report.client_id,
                demo::UNBOUND_POD,
                if report.unbound_pod_refused { " (Identity not found)" } else { "" }
            ));
            ExitCode::SUCCESS
        }
        Err(e) if demo::is_interrupted(e) || cancel.is_cancelled() => {
            progress.line(format_args!("Interrupted after {total}; cleaned up."));
            ExitCode::from(130)
        }
        Err(e) => {
            progress.line(format_args!("The demo failed after {total}: {e:#}"));
            ExitCode::FAILURE
        }
    };
    if left.is_empty() {
        progress.line(
            "Cleanup checked: no network namespace, process or temp dir of this run remains.",
        );
        code
    } else {
        progress.line(format_args!(
            "Cleanup incomplete, left: {}",
            left.join(", ")
        ));
        ExitCode::FAILURE
    }
}

/// First signal: cancel the demo and pass the signal on to the processes it runs at that moment
/// (as a terminal's Ctrl-C reaches the whole process group), so a running SDK call or build ends
/// now. Later ones only say that cleanup is under way; the third exits at once.
async fn wait_for_signals(
    mut int: tokio::signal::unix::Signal,
    mut term: tokio::signal::unix::Signal,
    cancel: &Cancel,
) {
    let mut count = 0;
    loop {
        let signal = tokio::select! {
            Some(()) = int.recv() => Signal::SIGINT,
            Some(()) = term.recv() => Signal::SIGTERM,
            else => return,
        };
        count += 1;
        match count {
            1 => {
                cancel.cancel();
                let _ = writeln!(std::io::stderr(), "\n{signal}: stopping, cleaning up…");
                for pid in demo::children_of(std::process::id()) {
                    let _ = kill(Pid::from_raw(pid as i32), signal);
                }
            }
            2 => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{signal}: still cleaning up (network namespaces, processes, temp dirs); once more to quit at once"
                );
            }
            _ => std::process::exit(130),
        }
    }
}
