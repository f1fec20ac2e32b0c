//! What every long-running role does with signals: SIGHUP reloads (the
//! policy file of a static-policy node, certificates), files are looked at
//! every second for the same, the first SIGTERM or SIGINT starts a drain,
//! and a second one exits at once. An edge with `--upgrade-socket` also
//! takes SIGQUIT: hand the listening sockets to a new process, then drain.

use std::time::Duration;

/// How a node stops (`switchyard edge`, `egress`, `control-plane`, `dev`).
#[derive(clap::Args, Clone, Copy)]
pub struct DrainArgs {
    /// On SIGTERM, how long requests and streams in flight may take to
    /// finish before they are cut (LLM streams can take minutes). A second
    /// SIGTERM or SIGINT exits at once.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    shutdown_grace_seconds: f64,
    /// On SIGTERM, how long the node keeps accepting with `/readyz` already
    /// false, so load balancers stop sending before the listeners close.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    drain_delay_seconds: f64,
}

impl DrainArgs {
    pub fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_seconds.clamp(0.0, 86_400.0))
    }

    pub fn delay(&self) -> Duration {
        Duration::from_secs_f64(self.drain_delay_seconds.clamp(0.0, 3_600.0))
    }
}

/// How often watched files are compared with what was loaded.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why [`run_until_stop`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: drain and exit.
    Drain,
    /// SIGQUIT (only when asked for): hand over the listeners, then drain.
    Upgrade,
}

/// Runs until the first SIGTERM or SIGINT (or SIGQUIT with `upgrade`),
/// calling `reload(true)` on SIGHUP and `reload(false)` (reload what
/// changed) every second. From then on a second SIGTERM or SIGINT exits the
/// process at once, whatever the drain is doing.
pub async fn run_until_stop(reload: impl Fn(bool), upgrade: bool) -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        // No signal handling (not expected on Unix): Ctrl-C still stops.
        let _ = tokio::signal::ctrl_c().await;
        return Stop::Drain;
    };
    // Only an edge that can hand its sockets over takes SIGQUIT; elsewhere
    // it keeps its default meaning.
    let mut quit = if upgrade {
        signal(SignalKind::quit()).ok()
    } else {
        None
    };
    let quit_received = async {
        match quit.as_mut() {
            Some(q) => {
                q.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(quit_received);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break Stop::Drain,
            _ = term.recv() => break Stop::Drain,
            _ = &mut quit_received => break Stop::Upgrade,
            _ = hup.recv() => {
                tracing::info!(target: "switchyard::reload", "SIGHUP: reloading");
                reload(true);
            }
            _ = tick.tick() => reload(false),
        }
    };
    if stop == Stop::Drain {
        exit_on_next_stop_signal();
    }
    stop
}

/// From now on a SIGTERM or SIGINT exits the process at once (a drain is
/// under way and the operator wants it over).
pub fn exit_on_next_stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    tokio::spawn(async move {
        let term_received = async {
            match term {
                Ok(mut t) => {
                    t.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term_received => {}
        }
        tracing::warn!(target: "switchyard::lifecycle", "second stop signal: exiting now");
        std::process::exit(130);
    });
}
