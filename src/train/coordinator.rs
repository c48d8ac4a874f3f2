//! The coordinator of a multi-node run (burn-collective's global orchestrator): `clue
//! coordinator --port P`, or a child process that rank 0 starts ([`Coordinator::start`]).

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{ClueError, Result};

/// Refuse a port this machine cannot listen on (taken, or not allowed), naming `what` it is for.
pub fn can_listen(port: u16, what: &str, fix: &str) -> Result<()> {
    TcpListener::bind(("0.0.0.0", port))
        .map(drop)
        .map_err(|e| ClueError::config(format!("{what} cannot listen on port {port}: {e}"), fix))
}

/// The coordinator rank 0 runs: a child process (`clue coordinator --port P`), stopped when
/// this is dropped (and by itself when its parent dies: its standard input closes).
pub struct Coordinator {
    child: Child,
}

impl Coordinator {
    /// Start the coordinator on `port`, its output in `log`. Fails if it cannot listen there.
    pub fn start(port: u16, log: &Path) -> Result<Self> {
        can_listen(
            port,
            "the coordinator",
            "choose a free port for --coordinator, or pass --coordinator-running if one already runs there",
        )?;
        let file = std::fs::File::create(log).map_err(|e| ClueError::io(log, e))?;
        let err = file.try_clone().map_err(|e| ClueError::io(log, e))?;
        let exe = std::env::current_exe().map_err(|e| ClueError::io("clue", e))?;
        let child = Command::new(exe)
            .args([
                "coordinator",
                "--port",
                &port.to_string(),
                "--until-stdin-closes",
            ])
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| ClueError::io("clue coordinator", e))?;
        let mut coordinator = Coordinator { child };
        // Up at once, or failed at once (its port taken in between).
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(Some(status)) = coordinator.child.try_wait() {
            return Err(ClueError::bad_file(
                log,
                format!("the coordinator stopped at once ({status})"),
                "read its log; choose a free port for --coordinator",
            ));
        }
        Ok(coordinator)
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        // The other nodes left at about the same time as this one (they met at the end): give
        // their goodbyes a moment to reach the coordinator.
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `clue coordinator --port P`: run the coordinator until Ctrl+C or SIGTERM, or (with
/// `until_stdin_closes`) until standard input closes.
pub fn serve_coordinator(port: u16, until_stdin_closes: bool) -> Result<()> {
    can_listen(port, "the coordinator", "choose a free port")?;
    if until_stdin_closes {
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| ClueError::io("the coordinator's runtime", e))?;
    eprintln!("clue coordinator: listening on port {port}");
    runtime.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}
