//! Multi-node data-parallel training (`clue fit --nodes N --node-rank R --coordinator HOST:PORT`),
//! on burn-collective's global mode.
//!
//! Every node runs the same command on the same data and config and makes the same plan; each
//! global batch is split over all `nodes × workers` workers and node R's workers take their
//! shares (see [`crate::train::parallel`]). The all-reduces go first between a node's workers,
//! then between nodes through each node's tensor service (`--node-address`), after the nodes
//! have met at the coordinator. Rank 0 starts the coordinator (`clue coordinator`,
//! [`crate::train::coordinator`]) as a child process unless `--coordinator-running` says one
//! already runs.
//!
//! The workers join once per run ([`Cluster::join`]) and leave when the [`Membership`] is
//! dropped. Joining waits for every node, with a time limit: an unreachable coordinator or a
//! node that never comes is an error, not a hang. Before training the nodes compare their plans
//! part by part (backend and float type, config, data, whether they resume, parameters, warm-up,
//! workers) and refuse to train apart, naming the part that differs. Resumed nodes then agree on
//! the newest checkpoint that every one of them holds ([`Resume`]): a node that stopped while
//! writing a checkpoint has an older one than the others. A node whose run has finished joins
//! too: it trains the last periods again with a node that has not, or, where every node has
//! finished, all of them say there is nothing to resume.

use std::net::ToSocketAddrs;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use burn::collective::{
    AllReduceStrategy, CollectiveConfig, PeerId, ReduceOperation, all_reduce, finish_collective,
    register, reset_collective,
};
use burn::module::Module;
use burn::prelude::*;
use burn::tensor::{DType, TensorPrimitive};
use burn_communication::Address;
use sha2::{Digest, Sha256};

use crate::error::{ClueError, Result};
use crate::train::config::{RunConfig, TrainConfig};
use crate::train::coordinator::{Coordinator, can_listen};
use crate::ui;

/// This node's place in a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub nodes: usize,
    pub rank: usize,
    /// The coordinator, `host:port`.
    pub coordinator: String,
    /// Where the other nodes reach this node's tensor service, `host:port`.
    pub node_address: String,
    coordinator_port: u16,
    node_port: u16,
    /// How long joining may wait for the coordinator and the other nodes.
    pub join_timeout: Duration,
    /// How long a collective call may wait for the other nodes.
    pub peer_timeout: Duration,
    /// Rank 0 starts the coordinator itself unless this says one already runs.
    pub coordinator_running: bool,
}

/// Where a process's workers sit among all the run's workers: node `rank` of `nodes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub rank: usize,
    pub nodes: usize,
    /// The longest a worker waits in one collective call for the other nodes (`--peer-timeout`;
    /// `None` on one node, whose workers cannot vanish).
    pub peer_timeout: Option<Duration>,
}

impl Default for Place {
    fn default() -> Self {
        Place {
            rank: 0,
            nodes: 1,
            peer_timeout: None,
        }
    }
}

impl Place {
    /// Several nodes: the workers joined once for the run ([`Cluster::join`]) instead of at
    /// every step.
    pub fn multi_node(self) -> bool {
        self.nodes > 1
    }
}

/// `host:port`, checked.
fn host_port(what: &str, text: &str) -> Result<(String, u16)> {
    let bad = || {
        ClueError::config(
            format!("{what} {text}: not HOST:PORT"),
            format!("give an address and a port, e.g. {what} 10.0.0.1:29500"),
        )
    };
    let text = text.strip_prefix("ws://").unwrap_or(text);
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port = u16::from_str(port).map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

impl Cluster {
    /// `--nodes`, `--node-rank`, `--coordinator`, `--node-address` (default on a loopback
    /// coordinator: 127.0.0.1 at the coordinator's port + 1 + rank), `--join-timeout` and
    /// `--peer-timeout`.
    pub fn new(
        nodes: usize,
        rank: usize,
        coordinator: Option<&str>,
        node_address: Option<&str>,
        [join_timeout, peer_timeout]: [Duration; 2],
        coordinator_running: bool,
    ) -> Result<Self> {
        if nodes < 2 {
            return Err(ClueError::config(
                format!("--nodes {nodes}: a multi-node run needs at least 2 nodes"),
                "leave --nodes out to train on one machine",
            ));
        }
        if rank >= nodes {
            return Err(ClueError::config(
                format!("--node-rank {rank} is out of range for --nodes {nodes}"),
                format!("give each node a rank from 0 to {}", nodes - 1),
            ));
        }
        let coordinator = coordinator.ok_or_else(|| {
            ClueError::config(
                "--nodes without --coordinator",
                "give every node the same coordinator, e.g. --coordinator 10.0.0.1:29500 (rank 0 starts it)",
            )
        })?;
        let (host, port) = host_port("--coordinator", coordinator)?;
        // A typo in a host name fails here, not after the join timeout.
        if !(host.as_str(), port)
            .to_socket_addrs()
            .is_ok_and(|mut a| a.next().is_some())
        {
            return Err(ClueError::config(
                format!("--coordinator {coordinator}: the host {host} does not resolve"),
                "give the coordinator's IP address or a host name this machine can resolve",
            ));
        }
        let (node_host, node_port) = match node_address {
            Some(a) => host_port("--node-address", a)?,
            None if matches!(host.as_str(), "127.0.0.1" | "localhost") => {
                let p = u16::try_from(port as usize + 1 + rank).map_err(|_| {
                    ClueError::config(
                        format!(
                            "--coordinator {coordinator}: no free port above it for node {rank}"
                        ),
                        "use a lower coordinator port, or give --node-address",
                    )
                })?;
                ("127.0.0.1".to_string(), p)
            }
            None => {
                return Err(ClueError::config(
                    "--node-address is needed when the coordinator is on another machine",
                    "give this machine's address and a free port that the other nodes can reach, e.g. --node-address 10.0.0.2:29501",
                ));
            }
        };
        if join_timeout.is_zero() {
            return Err(ClueError::config(
                "--join-timeout 0: joining would never wait for the other nodes",
                "give the seconds to wait, e.g. --join-timeout 120",
            ));
        }
        if peer_timeout.is_zero() {
            return Err(ClueError::config(
                "--peer-timeout 0: every step would fail while the nodes wait for each other",
                "give the seconds a node may wait for the others in one step, e.g. --peer-timeout 600",
            ));
        }
        Ok(Cluster {
            nodes,
            rank,
            coordinator: format!("{host}:{port}"),
            node_address: format!("{node_host}:{node_port}"),
            coordinator_port: port,
            node_port,
            join_timeout,
            peer_timeout,
            coordinator_running,
        })
    }

    pub fn place(&self) -> Place {
        Place {
            rank: self.rank,
            nodes: self.nodes,
            peer_timeout: Some(self.peer_timeout),
        }
    }

    /// burn-collective's configuration for `workers` workers on this node.
    fn config(&self, workers: usize) -> CollectiveConfig {
        let address = |a: &str| Address::from_str(&format!("ws://{a}")).expect("any text");
        CollectiveConfig::default()
            .with_num_devices(workers)
            .with_num_nodes(self.nodes as u32)
            .with_global_address(address(&self.coordinator))
            .with_node_address(address(&self.node_address))
            .with_data_service_port(self.node_port)
            // Centralized works for tensors of any size (the ring splits a tensor into one
            // slice per node, and the logit scale's gradient has one element).
            .with_global_all_reduce_strategy(AllReduceStrategy::Centralized)
    }

    /// Join the run with one worker per device: register every worker (global peer ids
    /// `rank × W + k`), wait for all the nodes (saying every [`JOIN_TICK`] that it still waits),
    /// then check that every node has this `plan`, naming the parts that differ. Fails, rather
    /// than waiting for ever, after the join timeout.
    ///
    /// With `resume`, the nodes (whose plans agree) then find the newest checkpoint that every
    /// node holds and whether every node has finished ([`Agreed`]); nodes with no checkpoint in
    /// common, where some node holds one or has finished, are refused
    /// ([`no_checkpoint_in_common`]): starting again would throw it away.
    pub fn join<B: Backend>(
        &self,
        devices: &[B::Device],
        plan: &[(&'static str, String)],
        resume: Option<&Resume>,
    ) -> Result<(Membership<B>, Agreed)> {
        // The node's tensor service listens on this port: say so now if it cannot.
        can_listen(
            self.node_port,
            &format!("--node-address {}:", self.node_address),
            "choose a free port for this node's --node-address",
        )?;
        reset_collective::<B>();
        let w = devices.len();
        let peers: Vec<PeerId> = (0..w).map(|k| PeerId((self.rank * w + k) as u32)).collect();
        // A stable hash (nodes may be built by different Rust releases).
        let hashes: Vec<u64> = (plan.iter())
            .map(|(what, value)| {
                let digest = Sha256::new()
                    .chain_update(what)
                    .chain_update([0])
                    .chain_update(value)
                    .finalize();
                u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
            })
            .collect();
        let (tx, rx) = mpsc::channel();
        for (&peer, device) in peers.iter().zip(devices) {
            let (tx, device, config) = (tx.clone(), device.clone(), self.config(w));
            let (hashes, resume) = (hashes.clone(), resume.cloned());
            // Detached: a join that never returns must not keep the process alive.
            std::thread::spawn(move || {
                let joined = register::<B>(peer, device.clone(), config)
                    .map_err(|e| format!("joining: {e:?}"))
                    .and_then(|()| same_plan::<B>(peer, &device, &hashes))
                    .and_then(|same| {
                        // Every node sees the same sums, so all of them take this branch or none.
                        let held = match resume {
                            Some(r) if same.iter().all(|&s| s) => {
                                r.newest_held::<B>(peer, &device)?
                            }
                            _ => Agreed::default(),
                        };
                        Ok((same, held))
                    });
                let _ = tx.send(joined);
            });
        }
        drop(tx);
        // Peers leave on drop only once all have joined (a half-made join may block the
        // collective's server).
        ABANDONED.store(false, Ordering::Relaxed);
        let mut membership = Membership { peers: Vec::new() };
        let joined: Vec<(PeerId, B::Device)> =
            peers.iter().copied().zip(devices.to_vec()).collect();
        let wait = self.join_timeout.as_secs();
        ui::say(format!(
            "node {} (ranks 0 to {}): joining the run at {} (waiting up to {wait} s for every node)",
            self.rank,
            self.nodes - 1,
            self.coordinator
        ));
        let start = Instant::now();
        let mut agreed = Agreed::default();
        for _ in 0..w {
            let answer = loop {
                let left = self.join_timeout.saturating_sub(start.elapsed());
                match rx.recv_timeout(left.min(JOIN_TICK)) {
                    Err(RecvTimeoutError::Timeout) if left > JOIN_TICK => ui::say(format!(
                        "node {}: still waiting for every node to join ({} s of {wait} s)",
                        self.rank,
                        start.elapsed().as_secs()
                    )),
                    answer => break answer,
                }
            };
            match answer {
                Ok(Ok((same, held))) if same.iter().all(|&s| s) => agreed = held,
                Ok(Ok((same, _))) => {
                    membership.peers = joined;
                    return Err(plans_differ(plan, &same));
                }
                Ok(Err(e)) => {
                    // burn-collective's error type cannot be named here: its text tells.
                    let hint = if e.contains("DoubleRegister") {
                        "the coordinator still holds the nodes of a run that lost a node (it forgets a node only when the node leaves): restart `clue coordinator`, then start every node again"
                    } else {
                        "start every node with the same --nodes and --coordinator, each with its own --node-rank"
                    };
                    return Err(ClueError::config(
                        format!(
                            "node {} could not join the run at {}: {e}",
                            self.rank, self.coordinator
                        ),
                        hint,
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(ClueError::config(
                        format!(
                            "node {} could not join the run at {}: a worker's join stopped without an answer (its panic is printed above)",
                            self.rank, self.coordinator
                        ),
                        "this is a bug in clue: please report it with the output above",
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(ClueError::config(
                        format!(
                            "node {} waited {} s at the coordinator {} and the run did not start",
                            self.rank,
                            self.join_timeout.as_secs(),
                            self.coordinator
                        ),
                        format!(
                            "start all {} nodes (ranks 0 to {}) within --join-timeout, check that {} is reachable from here and that rank 0 runs the coordinator",
                            self.nodes,
                            self.nodes - 1,
                            self.coordinator
                        ),
                    ));
                }
            }
        }
        membership.peers = joined;
        match resume {
            // Every node sees the same sums: all of them refuse, and meet once more as they leave.
            // Starting again from the first step would lose a checkpoint or a finished run.
            Some(r)
                if agreed.newest.is_none()
                    && !agreed.finished
                    && (agreed.held_anywhere || agreed.finished_anywhere) =>
            {
                Err(no_checkpoint_in_common(r, agreed.held_anywhere))
            }
            _ => Ok((membership, agreed)),
        }
    }
}

/// A resumed node's complete checkpoints (the periods after which they were written) among the
/// run's `periods`, and whether its run has finished (its summary is written).
#[derive(Debug, Clone)]
pub struct Resume {
    pub held: Vec<usize>,
    pub periods: usize,
    pub finished: bool,
}

/// What resumed nodes agree on when they join: the newest period whose checkpoint every node
/// holds (`None`: none is held by all, or the nodes do not resume), and whether every node's
/// run has finished (then there is nothing to resume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Agreed {
    pub newest: Option<usize>,
    pub finished: bool,
    /// Whether some node holds a checkpoint, and whether some node has finished.
    held_anywhere: bool,
    finished_anywhere: bool,
}

impl Resume {
    /// What every worker of every node holds ([`Agreed`]): one flag per period and one for a
    /// finished run, summed over the workers.
    fn newest_held<B: Backend>(
        &self,
        peer: PeerId,
        device: &B::Device,
    ) -> std::result::Result<Agreed, String> {
        let mut flags = vec![0.0; self.periods + 2];
        for &k in self.held.iter().filter(|&&k| k <= self.periods) {
            flags[k] = 1.0;
        }
        flags[self.periods + 1] = if self.finished { 1.0 } else { 0.0 };
        let (held_by, workers) = sum_over_workers::<B>(peer, device, flags)
            .map_err(|e| format!("comparing checkpoints: {e}"))?;
        let finished_by = held_by[self.periods + 1];
        Ok(Agreed {
            newest: (1..=self.periods).rev().find(|&k| held_by[k] == workers),
            finished: finished_by == workers,
            held_anywhere: held_by[..=self.periods].iter().any(|&n| n > 0.0),
            finished_anywhere: finished_by > 0.0,
        })
    }
}

/// The error of resumed nodes with no checkpoint in common where some node holds one
/// (`held_anywhere`) or, holding none, has finished: starting again would throw it away.
fn no_checkpoint_in_common(r: &Resume, held_anywhere: bool) -> ClueError {
    if !held_anywhere {
        let here = if r.finished { "has" } else { "has not" };
        return ClueError::config(
            format!(
                "some nodes have finished, and no node holds a checkpoint to train the others from (this node {here} finished)"
            ),
            "start every node again without --resume, each with a new --out (a finished node's model stays in its run directory)",
        );
    }
    let here = match r.held.as_slice() {
        [] => "none".to_string(),
        held => format!("{held:?}"),
    };
    ClueError::config(
        format!("the nodes hold no checkpoint in common (this node holds {here})"),
        "every node holds the same weights: copy the newest checkpoint's three files (checkpoint/model-K.mpk, optim-K.mpk and scheduler-K.mpk) from a node that holds it into the checkpoint folder of the others' run directories, then start every node again with --resume",
    )
}

/// For each of `hashes`, whether every worker of every node has it, as far as sums tell: the
/// sum of each of its bytes over all workers is the number of workers times this worker's byte
/// (other nodes' bytes that differ but average out would pass; with hashes, a matter of chance).
/// The sums are made in f32 whatever the backend's float type (bf16 would round them), exact up
/// to 65,793 workers. Also the run's last meeting, with no hashes ([`Membership`]'s drop).
fn same_plan<B: Backend>(
    peer: PeerId,
    device: &B::Device,
    hashes: &[u64],
) -> std::result::Result<Vec<bool>, String> {
    let bytes: Vec<f32> = (hashes.iter())
        .flat_map(|h| h.to_le_bytes())
        .map(f32::from)
        .collect();
    let (summed, workers) = sum_over_workers::<B>(peer, device, bytes.clone())
        .map_err(|e| format!("comparing plans: {e}"))?;
    Ok(bytes
        .chunks(8)
        .zip(summed.chunks(8))
        .map(|(own, sum)| own.iter().zip(sum).all(|(o, s)| o * workers == *s))
        .collect())
}

/// `values` summed over every worker of every node, and the number of workers. The sums are
/// made in f32 whatever the backend's float type (bf16 would round them): exact while they stay
/// below 2^24.
fn sum_over_workers<B: Backend>(
    peer: PeerId,
    device: &B::Device,
    mut values: Vec<f32>,
) -> std::result::Result<(Vec<f32>, f32), String> {
    values.push(1.0);
    let n = values.len();
    let own = Tensor::<B, 1>::from_data(TensorData::new(values, [n]), (device, DType::F32));
    let summed = all_reduce::<B>(peer, own.into_primitive().tensor(), ReduceOperation::Sum)
        .map_err(|e| format!("{e:?}"))?;
    let mut summed: Vec<f32> = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed))
        .into_data()
        .convert::<f32>()
        .to_vec()
        .map_err(|e| format!("{e:?}"))?;
    let workers = summed.pop().expect("the count");
    Ok((summed, workers))
}

/// The error of nodes whose plans differ in the parts `same` marks false.
fn plans_differ(plan: &[(&'static str, String)], same: &[bool]) -> ClueError {
    let differ: Vec<&str> = (plan.iter().zip(same))
        .filter(|(_, same)| !**same)
        .map(|((what, _), _)| *what)
        .collect();
    let resume = plan.iter().find(|(what, _)| *what == RESUME);
    match resume {
        Some((_, here)) if differ == [RESUME] => ClueError::config(
            format!(
                "the nodes do not run the same plan: some were started with --resume and some without (this node {here})"
            ),
            "start every node with --resume (they resume from the newest checkpoint that every node holds), or every node without it",
        ),
        _ => ClueError::config(
            format!(
                "the nodes do not run the same plan: their {} {}",
                differ.join(", "),
                if differ.len() == 1 {
                    "differs"
                } else {
                    "differ"
                }
            ),
            "run every node with the same --config/--set, the same prepared data (same manifest), the same --devices count, the same --backend and --precision and the same --resume state",
        ),
    }
}

/// A node's workers, joined for the whole run. When dropped they meet every other node's workers
/// once more (so that no node leaves while another still sends), then leave; a node that does
/// not come within the time limit is left behind rather than waited for. After
/// [`abandon_membership`] they leave at once. One membership per process at a time (as
/// burn-collective's server is one per process and backend).
pub struct Membership<B: Backend> {
    peers: Vec<(PeerId, B::Device)>,
}

/// A step gave up on the other nodes ([`abandon_membership`]): the run's end leaves without
/// meeting them again.
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// Called when a worker is left waiting in a collective call for nodes that stopped answering,
/// or when a collective call failed (a node left): the [`Membership`]'s end then leaves at once
/// instead of calling the other nodes again (which would wait out its time limit, behind a
/// stuck call, or fail).
pub fn abandon_membership() {
    ABANDONED.store(true, Ordering::Relaxed);
}

impl<B: Backend> Drop for Membership<B> {
    fn drop(&mut self) {
        if self.peers.is_empty() || ABANDONED.load(Ordering::Relaxed) {
            return;
        }
        let (tx, rx) = mpsc::channel();
        for (peer, device) in self.peers.drain(..) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = same_plan::<B>(peer, &device, &[]);
                let _ = finish_collective::<B>(peer);
                let _ = tx.send(());
            });
        }
        drop(tx);
        let deadline = Instant::now() + LEAVE_TIMEOUT;
        while rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
        {}
    }
}

/// "2 nodes × 1 worker": a run's nodes and the workers of each.
pub fn nodes_by_workers(nodes: usize, workers: usize) -> String {
    let s = if workers == 1 { "" } else { "s" };
    format!("{nodes} nodes × {workers} worker{s}")
}

/// How long the end of a run waits for the other nodes.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How often a node waiting for the others to join says that it still waits.
const JOIN_TICK: Duration = Duration::from_secs(30);

/// What every node of a run must have the same of: the config (not its data-loader threads),
/// the prepared data, whether it resumes, the ids of the model's parameters (the order in which
/// gradients are laid end to end) and the warm-up's steps (`warm`,
/// [`crate::train::warmup::WarmPlan::steps`]: none on a CPU backend; a GPU node with a CPU node
/// would otherwise train out of step by the warm-up's steps).
pub fn plan_id<B: Backend, M: Module<B>>(
    config: &RunConfig,
    manifest_sha256: &str,
    resume: bool,
    model: &M,
    warm: Option<String>,
) -> Plan {
    let mut config = config.clone();
    config.train.workers = 0;
    let ids = burn::module::list_param_ids(model);
    let resume = match resume {
        false => "without --resume",
        true => "with --resume",
    };
    vec![
        // Its type names the float type too (`--precision`).
        ("backend", std::any::type_name::<B>().to_string()),
        ("config", config.to_toml()),
        ("prepared data", manifest_sha256.to_string()),
        (RESUME, resume.to_string()),
        ("model's parameters", format!("{ids:?}")),
        ("GPU warm-up", format!("{warm:?}")),
    ]
}

/// What every node must have the same of: (what it is, its value), compared by hash.
pub type Plan = Vec<(&'static str, String)>;

/// The plan part that says whether a run resumes.
const RESUME: &str = "--resume";

/// A running multi-node membership: the coordinator (on rank 0) and this node's workers.
pub struct Joined<B: Backend> {
    // Dropped in this order: the workers leave, then the coordinator stops.
    _membership: Membership<B>,
    _coordinator: Option<Coordinator>,
}

impl Cluster {
    /// Before training: check that the batch splits over every worker of every node, start the
    /// coordinator on rank 0 (its log in `run/coordinator.log`), and join with one worker per
    /// device. `plan` names what must be the same on every node; with `resume`, also returns
    /// what the nodes agree on ([`Cluster::join`]).
    pub fn start<B: Backend>(
        &self,
        train: &TrainConfig,
        devices: &[B::Device],
        (plan, resume): (&[(&'static str, String)], Option<&Resume>),
        run: &Path,
    ) -> Result<(Joined<B>, Agreed)> {
        let all = self.nodes * devices.len();
        if !train.batch_size.is_multiple_of(all) {
            return Err(ClueError::config(
                format!(
                    "train.batch_size = {} does not divide into {}",
                    train.batch_size,
                    nodes_by_workers(self.nodes, devices.len())
                ),
                format!("use a batch size that is a multiple of {all}"),
            ));
        }
        let coordinator = self.start_coordinator(&run.join("coordinator.log"))?;
        // Every node must also have the same number of workers (peer ids are rank × W + k).
        let mut plan = plan.to_vec();
        plan.push(("number of workers", devices.len().to_string()));
        let (membership, agreed) = self.join::<B>(devices, &plan, resume)?;
        let joined = Joined {
            _membership: membership,
            _coordinator: coordinator,
        };
        Ok((joined, agreed))
    }

    /// On rank 0 (unless the coordinator already runs): start the coordinator, its output in
    /// `log`. Fails if it cannot listen on its port.
    pub fn start_coordinator(&self, log: &Path) -> Result<Option<Coordinator>> {
        let ours = self.rank == 0 && !self.coordinator_running;
        ours.then(|| Coordinator::start(self.coordinator_port, log))
            .transpose()
    }
}
