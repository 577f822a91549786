//! `serve --on-primary-loss CMD --primary-timeout SECS`: once a primary has attached, runs CMD
//! (with `sh -c`) when no frame has come from a primary for SECS, whether its connection is
//! still open but silent or gone. Fires once per attach; the next attach re-arms it. The
//! command runs on its own: nothing on the I/O path waits for it, a thread reaps it.

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use log::{error, info, warn};

use crate::config::PrimaryLoss;
use crate::server::Node;

/// How often the primary's silence is checked.
const TICK: Duration = Duration::from_millis(100);

/// Starts the watchdog thread.
pub fn spawn(node: Arc<Node>, hook: PrimaryLoss, control: Option<PathBuf>) -> io::Result<()> {
    info!(
        "--on-primary-loss: running {:?} when the primary is silent for {} s",
        hook.command,
        hook.timeout.as_secs()
    );
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || watch(&node, &hook, control))
        .map(|_| ())
}

fn watch(node: &Node, hook: &PrimaryLoss, control: Option<PathBuf>) {
    let status = &node.status;
    // The attach count when the command last ran: fired for that attach already.
    let mut fired_for = 0;
    loop {
        std::thread::sleep(TICK);
        if node.slot.is_fenced() {
            // Promoted: there is no primary to lose any more.
            return;
        }
        let attaches = status.attaches();
        if attaches == 0 || attaches == fired_for {
            continue;
        }
        let Some(idle) = status.primary_idle() else {
            continue;
        };
        if idle < hook.timeout {
            continue;
        }
        fired_for = attaches;
        let last = status.last_primary();
        warn!(
            "primary silent for {} s: running {}",
            idle.as_secs(),
            hook.command
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&hook.command)
            .env("ACCESS_NODE_IMAGE", status.image())
            .stdin(Stdio::null());
        if let Some(c) = &control {
            cmd.env("ACCESS_NODE_CONTROL", c);
        }
        if let Some(p) = last {
            cmd.env("ACCESS_NODE_LAST_PRIMARY", p.to_string());
        }
        match cmd.spawn() {
            Ok(child) => reap(child, hook.command.clone()),
            Err(e) => error!(
                "cannot run --on-primary-loss command {:?}: {e}",
                hook.command
            ),
        }
    }
}

/// Waits for the command in a thread of its own and logs how it ended.
fn reap(mut child: Child, command: String) {
    let pid = child.id();
    let spawned = std::thread::Builder::new()
        .name("on-primary-loss".into())
        .spawn(move || match child.wait() {
            Ok(st) if st.success() => info!("--on-primary-loss command (pid {pid}) exited 0"),
            Ok(st) => warn!("--on-primary-loss command {command:?} (pid {pid}) ended: {st}"),
            Err(e) => warn!("cannot wait for --on-primary-loss command (pid {pid}): {e}"),
        });
    if let Err(e) = spawned {
        // The child is left a zombie until the process exits; it has run all the same.
        warn!("cannot start a thread to reap --on-primary-loss command (pid {pid}): {e}");
    }
}
