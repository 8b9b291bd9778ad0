//! `iovatrack migrate`: one process over loopback, or `send` / `receive` as two.

use crate::output::{emit, EXIT_BROKEN_PIPE};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use iovatrack::layout::{self, parse_size, presets, Layout};
use iovatrack::migrate::demo::viommu::{ViommuConfig, ViommuFault};
use iovatrack::migrate::demo::{self, DmaConfig, DmaPattern, Fault, MigrateConfig, Summary};
use iovatrack::migrate::engine::{
    self, Event, MigrateError, TimeoutAction, Tls, TlsError, Transport,
};
use iovatrack::migrate::guest::GuestError;
use iovatrack::migrate::{self, scale_ram};
use iovatrack::plan::limits::DeviceProfile;
use iovatrack::range::human_bytes;
use iovatrack::track::ModeChoice;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Arguments of `iovatrack migrate`. Without a subcommand both ends run in this process;
/// flags given before `send`/`receive` are refused rather than silently ignored.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MigrateArgs {
    #[command(subcommand)]
    mode: Option<Mode>,
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    source: SourceArgs,
    /// One process: both ends use the same certificate, which must name 127.0.0.1 (or
    /// --tls-hostname).
    #[command(flatten)]
    tls: TlsArgs,
    /// With --tls-*: the name the destination's certificate must carry (default: the
    /// address connected to).
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    tls_hostname: Option<String>,
    #[command(flatten)]
    dest: DestArgs,
}

/// TLS 1.3 with mutual authentication: all three files, or none (plain TCP).
#[derive(Args, Clone)]
struct TlsArgs {
    /// This side's certificate chain, PEM, leaf first (with --tls-key and --tls-ca: TLS
    /// with mutual authentication; a receiver then refuses sources without a certificate
    /// signed by the CA).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert, PEM.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA certificate(s), PEM, that must have signed the peer's certificate.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The transport these flags ask for; a source checks the destination's certificate
    /// against `hostname`, else the host of `to`, else the address it connects to.
    fn transport(
        &self,
        hostname: Option<&str>,
        to: Option<&str>,
    ) -> Result<Arc<dyn Transport>, BoxError> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(Arc::new(engine::PlainTcp));
        };
        let tls = Tls::from_pem_files(cert, key, ca)?;
        Ok(Arc::new(match (hostname, to) {
            (Some(h), _) => tls.server_name(h)?,
            (None, Some(to)) => tls.server_name_for_addr(to)?,
            (None, None) => tls,
        }))
    }
}

#[derive(Subcommand)]
enum Mode {
    /// Run the source: migrate the guest to a receiver.
    Send {
        /// The receiver's address, e.g. 10.0.0.2:7000.
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// With --tls-*: the name the destination's certificate must carry (default: the
        /// host part of --to; an IP address must be an IP SAN of the certificate).
        #[arg(long, value_name = "NAME", requires = "tls_cert")]
        tls_hostname: Option<String>,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// Run the destination: receive, verify and resume a guest.
    Receive {
        /// Address to listen on, e.g. 0.0.0.0:7000.
        #[arg(long, value_name = "ADDR")]
        listen: String,
        /// Seconds to wait for a source to connect (from the start, or from the last
        /// session of ours; refused strangers do not extend it).
        #[arg(long, default_value_t = 120)]
        accept_timeout: u64,
        /// Refused connections (garbage, a wrong Hello, over a limit, closed before
        /// Hello) before the receiver gives up.
        #[arg(long, default_value_t = 64)]
        max_refused: u32,
        /// Device-state bytes one device may receive in one session (K/M/G suffixes).
        #[arg(long, default_value = "64M", value_parser = parse_rate)]
        max_device_state: u64,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        guest: GuestArgs,
        #[command(flatten)]
        dest: DestArgs,
    },
}

/// How the destination holds the guest.
#[derive(Args, Clone)]
struct DestArgs {
    /// Allocate all of the destination's guest RAM before the source connects, as a
    /// destination with a passthrough device has it (mapping RAM for the device's DMA pins
    /// every page): received pages then cost no page fault and no zeroing.
    #[arg(long)]
    prealloc: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum PatternArg {
    Ring,
    Random,
    Hot,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Generic,
    Mlx5,
    /// pds on 6.8+ kernels (several regions).
    Pds,
    /// pds on 6.6 kernels (one region).
    #[value(name = "pds-6.6")]
    Pds66,
}

#[derive(Clone, Copy, ValueEnum)]
enum TrackingArg {
    /// Device logging, else IOMMU tracking, else all dirty.
    Auto,
    Device,
    Iommu,
    AllDirty,
}

#[derive(Clone, Copy, ValueEnum)]
enum TimeoutArg {
    Cancel,
    Force,
}

/// What both ends must agree on: the guest's memory map and devices, and the session
/// budget and timeouts.
#[derive(Args, Clone)]
struct GuestArgs {
    /// Guest memory map: `info mtree -f` text or JSON. Default: the q35-2g preset.
    #[arg(long, value_name = "FILE")]
    layout: Option<String>,
    /// Use an embedded layout instead.
    #[arg(long, conflicts_with = "layout")]
    preset: Option<String>,
    /// Shrink every RAM section by this factor (keeps the layout's shape).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    scale: u64,
    /// An emulated device's driver profile; repeat for several devices (dma0, dma1, ...).
    #[arg(long, value_enum, default_values = ["mlx5"])]
    device: Vec<DeviceArg>,
    /// Attempts after a dropped or cancelled one (the receiver serves as many sessions
    /// after an interrupted one).
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Seconds either side waits for the peer's next frame (a dead link is found sooner
    /// by keepalives; this bounds a live but silent peer, so it must cover the longest
    /// work between frames, such as hashing a large guest).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    read_timeout: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

/// The source's guest, workload, convergence and faults.
#[derive(Args, Clone)]
struct SourceArgs {
    /// Use the software vCPU even where /dev/kvm exists.
    #[arg(long)]
    no_kvm: bool,
    /// Pages per second the guest dirties (0 = unlimited). Default: unlimited with a
    /// non-zero --working-set (a guest rewriting its working set as fast as it can), else
    /// 20000.
    #[arg(long)]
    cpu_rate: Option<u64>,
    /// Percent of guest RAM filled with data before migration (a booted OS's page cache).
    /// Default: 25 %, at most 1 GiB of data (so a 1 TiB layout does not fill this host).
    #[arg(long, value_name = "PCT",
          value_parser = clap::value_parser!(u8).range(0..=100))]
    warm: Option<u8>,
    /// Guest vCPUs (KVM) or writer threads (software guest).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Bytes of RAM the guest keeps dirtying (K/M/G suffixes; 0 = all RAM, the default).
    #[arg(long, value_name = "SIZE", value_parser = parse_rate)]
    working_set: Option<u64>,
    /// DMA writes per second (0 = unlimited).
    #[arg(long, default_value_t = 20_000)]
    dma_rate: u64,
    /// DMA writer threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    dma_threads: u64,
    /// Bytes per DMA write (8 to 4088, a multiple of 8).
    #[arg(long, default_value_t = 512, value_parser = parse_dma_len)]
    dma_len: u64,
    /// Which pages the device writes.
    #[arg(long, value_enum, default_value = "ring")]
    pattern: PatternArg,
    /// Containers to spread the devices over (device i in container i mod N); each
    /// container plans its ranges for its strictest device.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    containers: u32,
    /// Force a tracking mode (a mode that cannot run is an error).
    #[arg(long, value_enum, default_value = "auto")]
    tracking: TrackingArg,
    /// Most ranges the planner may give the device.
    #[arg(long, default_value_t = 256)]
    max_ranges: u32,
    /// Downtime budget in milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Most pre-copy passes before stop-and-copy is forced.
    #[arg(long, default_value_t = 30)]
    max_iterations: u32,
    /// Pre-copy time limit in seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Throttle the vCPUs in steps when they dirty faster than the link drains (QEMU's
    /// auto-converge).
    #[arg(long)]
    auto_converge: bool,
    /// First throttle step, percent.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_initial: u8,
    /// Each further throttle step, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_increment: u8,
    /// At the timeout: cancel (source keeps running) or force stop-and-copy.
    #[arg(long, value_enum, default_value = "force")]
    timeout_action: TimeoutArg,
    /// Cap the link, bytes per second (K/M/G suffixes; 0 = none; over all streams).
    #[arg(long, default_value = "0", value_parser = parse_rate)]
    bandwidth: u64,
    /// Connections carrying pages, as QEMU's multifd channels: the main one and N - 1
    /// more, each with its own sender and receiver thread; every pass's pages are dealt
    /// out over all of them, and a pass is acknowledged once every stream delivered it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=32))]
    streams: u32,
    /// Read the CPU dirty log this often during a pre-copy pass, not only when a pass
    /// begins (0 = once per pass, as QEMU): the dirty rate is then measured over short
    /// windows; each read write-protects the guest's pages again.
    #[arg(long, value_name = "MS", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    cpu_log_interval_ms: u64,
    /// Inject a fault (repeatable): report-fail@N, start-e2big, drop@N, cancel@N,
    /// drop-before-commit, drop-after-commit, iommu-across-holes, corrupt-device-state; with
    /// --viommu also the negative controls viommu-no-unmap-query, viommu-naive-rearm,
    /// viommu-no-translate.
    #[arg(long = "inject", value_name = "FAULT")]
    inject: Vec<Inject>,
    /// Put the devices behind a vIOMMU: the guest maps and unmaps its own DMA (rings and
    /// streaming buffers) all through the migration, and tracking runs in IOVA space.
    #[arg(long)]
    viommu: bool,
    /// With --viommu: streaming map/DMA/unmap cycles per second (0 = unlimited).
    #[arg(long, default_value_t = 2_000)]
    map_rate: u64,
    /// With --viommu: the device's DMA mask in bits (IOVAs are allocated top-down below it).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(20..=63))]
    dma_mask: u8,
    /// With --viommu: bytes logged below the lowest mapped IOVA at each START (K/M/G).
    #[arg(long, default_value = "128K", value_parser = parse_rate)]
    headroom: u64,
    /// Negative control: do not track device DMA (the destination must end up wrong).
    #[arg(long)]
    no_device_tracking: bool,
    /// Random seed of the DMA pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A fault for `--inject`: the engine's, or a vIOMMU negative control.
#[derive(Clone, Copy, Debug)]
enum Inject {
    Engine(Fault),
    Viommu(ViommuFault),
}

impl std::str::FromStr for Inject {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("viommu-") {
            return s.parse().map(Inject::Viommu);
        }
        s.parse()
            .map(Inject::Engine)
            .map_err(|e: String| format!("{e}; with --viommu also {}", ViommuFault::SYNTAX))
    }
}

/// A DMA write length: whole u64 words within one page, clear of its first word.
fn parse_dma_len(s: &str) -> Result<u64, String> {
    let n = parse_size(s).map_err(|e| format!("{s:?}: {e}"))?;
    if (8..=4088).contains(&n) && n % 8 == 0 {
        Ok(n)
    } else {
        Err(format!(
            "{n} bytes: a DMA write is 8 to 4088 bytes, a multiple of 8"
        ))
    }
}

/// A rate in bytes per second: a size (`100M`, `1G`, `0x1000`), optionally ending in `/s`.
fn parse_rate(s: &str) -> Result<u64, String> {
    parse_size(s.trim().trim_end_matches("/s")).map_err(|e| format!("{s:?}: {e}"))
}

fn layout_of(c: &GuestArgs) -> Result<Layout, BoxError> {
    let l = match (&c.layout, &c.preset) {
        (Some(f), _) => layout::load_file(f, None)?,
        (None, Some(p)) => presets::get(p)?,
        (None, None) => presets::get("q35-2g")?,
    };
    Ok(scale_ram(&l, c.scale))
}

/// The configuration both ends share.
fn guest_config(g: &GuestArgs) -> Result<MigrateConfig, BoxError> {
    let mut cfg = MigrateConfig::new(layout_of(g)?);
    cfg.devices = g
        .device
        .iter()
        .map(|d| {
            match d {
                DeviceArg::Generic => DeviceProfile::Generic,
                DeviceArg::Mlx5 => DeviceProfile::Mlx5,
                DeviceArg::Pds => DeviceProfile::Pds,
                DeviceArg::Pds66 => DeviceProfile::Pds66,
            }
            .limits()
        })
        .collect();
    cfg.engine.retries = g.retries;
    cfg.engine.read_timeout = Duration::from_secs(g.read_timeout);
    Ok(cfg)
}

/// The source's whole configuration.
fn config(g: &GuestArgs, c: &SourceArgs) -> Result<MigrateConfig, BoxError> {
    let mut cfg = guest_config(g)?;
    cfg.use_kvm = !c.no_kvm;
    cfg.cpu_rate = c
        .cpu_rate
        .unwrap_or(if c.working_set.is_some_and(|w| w > 0) {
            0
        } else {
            20_000
        });
    cfg.warm_pct = c.warm.unwrap_or_else(|| {
        let ram: u64 = migrate::guest_regions(&cfg.layout)
            .iter()
            .map(|r| r.1)
            .sum();
        (25u64.min((100u64 << 30) / ram.max(1))) as u8
    });
    cfg.vcpus = c.vcpus as usize;
    cfg.working_set = c.working_set.unwrap_or(0);
    cfg.dma = DmaConfig {
        threads: c.dma_threads as usize,
        rate: c.dma_rate,
        write_len: c.dma_len,
        pattern: match c.pattern {
            PatternArg::Ring => DmaPattern::Ring,
            PatternArg::Random => DmaPattern::Random,
            PatternArg::Hot => DmaPattern::Hot,
        },
        seed: c.seed,
        ..DmaConfig::default()
    };
    cfg.containers = c.containers as usize;
    cfg.device_tracking = !c.no_device_tracking;
    cfg.tracking = match c.tracking {
        TrackingArg::Auto => ModeChoice::Auto,
        TrackingArg::Device => ModeChoice::Device,
        TrackingArg::Iommu => ModeChoice::Iommu,
        TrackingArg::AllDirty => ModeChoice::AllDirty,
    };
    cfg.max_ranges = c.max_ranges;
    cfg.engine.downtime_ms = c.downtime_ms;
    cfg.engine.max_iterations = c.max_iterations;
    cfg.engine.timeout = Duration::from_secs(c.timeout);
    cfg.engine.timeout_action = match c.timeout_action {
        TimeoutArg::Cancel => TimeoutAction::Cancel,
        TimeoutArg::Force => TimeoutAction::Force,
    };
    cfg.engine.bandwidth = c.bandwidth;
    cfg.engine.streams = c.streams;
    cfg.engine.cpu_log_interval =
        (c.cpu_log_interval_ms > 0).then(|| Duration::from_millis(c.cpu_log_interval_ms));
    cfg.engine.auto_converge = c.auto_converge;
    cfg.engine.throttle_initial = c.throttle_initial;
    cfg.engine.throttle_increment = c.throttle_increment;
    cfg.faults = c
        .inject
        .iter()
        .filter_map(|i| match i {
            Inject::Engine(f) => Some(*f),
            Inject::Viommu(_) => None,
        })
        .collect();
    let viommu_fault = c.inject.iter().find_map(|i| match i {
        Inject::Viommu(f) => Some(*f),
        Inject::Engine(_) => None,
    });
    if viommu_fault.is_some() && !c.viommu {
        return Err(format!(
            "--inject {} needs --viommu",
            viommu_fault.unwrap_or(ViommuFault::NoTranslate)
        )
        .into());
    }
    if c.viommu {
        cfg.viommu = Some(ViommuConfig {
            map_rate: c.map_rate,
            dma_mask_bits: c.dma_mask,
            headroom: c.headroom,
            seed: c.seed,
            fault: viommu_fault,
            ..ViommuConfig::default()
        });
    }
    Ok(cfg)
}

/// Progress output: bars on a terminal, one line per pass otherwise (stderr either way).
struct Progress {
    bar: Option<ProgressBar>,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        Progress {
            bar: None,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn on(&mut self, e: Event) {
        match e {
            Event::Tracking {
                container,
                mode,
                ranges,
                reason,
            } => {
                let total: u128 = ranges.iter().map(|r| r.length as u128).sum();
                eprintln!(
                    "tracking {container}: {mode} mode, {} range(s), {}{}",
                    ranges.len(),
                    human_bytes(total),
                    reason.map(|r| format!(" ({r})")).unwrap_or_default()
                );
            }
            Event::PassStart {
                attempt,
                pass,
                pages,
                final_pass,
            } if self.tty => {
                let bar = ProgressBar::new(pages.max(1));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>14} [{bar:32}] {pos}/{len} pages {msg}")
                        .expect("a valid template")
                        .progress_chars("=> "),
                );
                let label = if final_pass {
                    "stop-and-copy".to_string()
                } else {
                    format!("pass {pass}")
                };
                bar.set_prefix(if attempt > 0 {
                    format!("#{attempt} {label}")
                } else {
                    label
                });
                self.bar = Some(bar);
            }
            Event::PassProgress { sent } => {
                if let Some(b) = &self.bar {
                    b.set_position(sent);
                }
            }
            Event::Pass(p) => {
                let mib_s = if p.secs > 0.0 {
                    p.bytes as f64 / p.secs / (1 << 20) as f64
                } else {
                    0.0
                };
                let line = format!(
                    "{}pass {:>2}: sent {:>7} pages ({}), {:>8.1} MiB/s, cpu dirty {:>6}, device dirty {:>6}, {} {:.1} ms",
                    if p.attempt > 0 { format!("#{} ", p.attempt) } else { String::new() },
                    p.pass,
                    p.pages,
                    human_bytes(p.bytes as u128),
                    mib_s,
                    p.cpu_dirty,
                    p.device_dirty,
                    if p.final_pass { "downtime" } else { "est. downtime" },
                    p.est_downtime_ms
                );
                match self.bar.take() {
                    Some(b) => b.finish_with_message(format!(
                        "{mib_s:.1} MiB/s, est. downtime {:.1} ms",
                        p.est_downtime_ms
                    )),
                    None => eprintln!("{line}"),
                }
            }
            Event::Throttle { pct } => eprintln!("auto-converge: vCPUs throttled to {pct}%"),
            Event::Switchover { reason } => eprintln!("stop-and-copy: {reason}"),
            Event::Retry { attempt, reason } => {
                if let Some(b) = self.bar.take() {
                    b.abandon_with_message("interrupted");
                }
                eprintln!("attempt {attempt}: retrying after: {reason}");
            }
            Event::PassStart { .. } => {}
        }
    }
}

/// The summary as text or JSON.
/// `local`: the destination ran in this process (else only the receiver knows whether
/// the guest resumed there).
fn summary_text(s: &Summary, json: bool, local: bool) -> Result<String, BoxError> {
    if json {
        return Ok(serde_json::to_string_pretty(s)? + "\n");
    }
    let mut out = String::from("\n");
    let _ = writeln!(
        out,
        "{}: {} guest, {}, {} pass(es), {} attempt(s), {} stream(s)",
        if s.verified {
            "VERIFIED"
        } else {
            "NOT VERIFIED"
        },
        s.guest,
        if s.mode == "none" {
            "no device tracking (negative control)".to_string()
        } else {
            format!("{} tracking", s.mode)
        },
        s.passes,
        s.attempts,
        s.streams
    );
    let _ = writeln!(
        out,
        "  sent            {} pages, {} acknowledged ({} on the wire)",
        s.pages_sent,
        human_bytes(s.bytes_sent as u128),
        human_bytes(s.bytes_on_wire as u128)
    );
    let _ = writeln!(
        out,
        "  transport       {}",
        match s.transport.as_str() {
            "tls" => "tls (TLS 1.3, both ends authenticated by certificate)",
            "tcp" => "tcp (unauthenticated)",
            other => other,
        }
    );
    let _ = writeln!(out, "  handover        {:?}", s.handover);
    let _ = writeln!(
        out,
        "  downtime        {:.1} ms (stop-and-copy: {})",
        s.downtime_ms, s.switchover_reason
    );
    if s.verify_ms > 0.0 {
        let _ = writeln!(
            out,
            "  verification    {:.1} ms after it, the guest still paused until Commit",
            s.verify_ms
        );
    }
    let _ = writeln!(out, "  mismatched      {} page(s)", s.mismatched_pages);
    let _ = writeln!(
        out,
        "  duplicates      {} page(s) sent twice in a pass",
        s.duplicate_pages_sent
    );
    let _ = writeln!(
        out,
        "  dirt            cpu {} pages, device {} pages; DMA writes {} ({} untracked)",
        s.cpu_dirty_pages, s.device_dirty_pages, s.dma_writes, s.untracked_dma_writes
    );
    if local {
        let _ = writeln!(
            out,
            "  destination     resumed: {}, device state restored: {}, received as sent: {}",
            s.resumed_on_destination, s.device_state_restored, s.device_state_matched
        );
    } else {
        let _ = writeln!(
            out,
            "  destination     device state received as sent: {}; its resume is in the receiver's report",
            s.device_state_matched
        );
    }
    if let Some(c) = &s.negative_control {
        let _ = writeln!(out, "  the negative control proved {}: {}", c.proved, c.why);
    }
    if s.viommu {
        let _ = writeln!(
            out,
            "  vIOMMU          {} maps, {} unmaps ({} queried first), {} re-arm(s) adding {} page(s), maps held {:.1} ms (longest {:.1} ms), {} blocked DMA(s)",
            s.viommu_maps,
            s.viommu_unmaps,
            s.unmap_queries,
            s.viommu_rearms,
            s.rearm_pages,
            s.map_hold_ms,
            s.max_map_hold_ms,
            s.viommu_dma_faults
        );
    }
    for d in &s.device_reports {
        let _ = writeln!(
            out,
            "  device {:<8} {} ({} tracking), {} state",
            d.name,
            d.container,
            d.mode,
            human_bytes(d.state_bytes as u128)
        );
    }
    if let Some(a) = &s.aborted {
        let _ = writeln!(
            out,
            "  aborted         {a} (source still running: {})",
            s.source_running_after_abort.unwrap_or(false)
        );
    }
    Ok(out)
}

/// What the operator can do about an error, in this CLI's terms (the library's errors
/// name no flags).
pub fn hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    if let Some(t) = e.downcast_ref::<TlsError>() {
        return tls_hint(t);
    }
    match e.downcast_ref::<MigrateError>()? {
        MigrateError::Guest(GuestError::PageTablesTooLarge { .. }) => {
            Some("--scale N shrinks every RAM section N times, keeping the layout's shape")
        }
        _ => None,
    }
}

/// What to do about a TLS setup error.
fn tls_hint(e: &TlsError) -> Option<&'static str> {
    Some(match e {
        TlsError::Read { .. } => {
            "--tls-cert, --tls-key and --tls-ca take PEM files; README \"Authentication (TLS)\" shows how to make them"
        }
        TlsError::NoCertificate { holds_key: true, .. }
        | TlsError::NoKey {
            holds_certificate: true,
            ..
        } => "--tls-cert takes the certificate and --tls-key its private key: swapped?",
        TlsError::BadPem { .. } | TlsError::NoCertificate { .. } | TlsError::NoKey { .. } => {
            "--tls-cert and --tls-ca hold `BEGIN CERTIFICATE` sections, --tls-key a `BEGIN PRIVATE KEY` section"
        }
        TlsError::KeyMismatch { .. } => {
            "--tls-key must be the key --tls-cert was issued for (compare `openssl x509 -noout -pubkey -in CERT` with `openssl pkey -pubout -in KEY`)"
        }
        TlsError::BadServerName { .. } => {
            "--tls-hostname takes a DNS name or an IP address, without a port"
        }
        _ => return None,
    })
}

/// Run `iovatrack migrate`.
pub fn run(a: MigrateArgs) -> Result<ExitCode, BoxError> {
    let mut progress = Progress::new();
    let (summary, json, local) = match a.mode {
        None => {
            let mut cfg = config(&a.guest, &a.source)?;
            cfg.transport = a.tls.transport(a.tls_hostname.as_deref(), None)?;
            cfg.prealloc = a.dest.prealloc;
            (
                demo::run_local(&cfg, &mut |e| progress.on(e))?,
                a.guest.json,
                true,
            )
        }
        Some(Mode::Send {
            to,
            tls,
            tls_hostname,
            guest,
            source,
        }) => {
            let mut cfg = config(&guest, &source)?;
            cfg.transport = tls.transport(tls_hostname.as_deref(), Some(&to))?;
            let connect = engine::connector(to.as_str(), cfg.transport.clone())?;
            (
                demo::run_source(&cfg, connect, &mut |e| progress.on(e))?,
                guest.json,
                false,
            )
        }
        Some(Mode::Receive {
            listen,
            accept_timeout,
            max_refused,
            max_device_state,
            tls,
            guest,
            dest: dest_args,
        }) => {
            let cfg = guest_config(&guest)?;
            let transport = tls.transport(None, None)?;
            let limits = engine::DestLimits {
                max_refused,
                device_state_bytes: max_device_state,
                session_state_bytes: engine::DestLimits::default()
                    .session_state_bytes
                    .max(max_device_state),
                read_timeout: cfg.engine.read_timeout,
                ..engine::DestLimits::default()
            };
            let listener = TcpListener::bind(&listen)
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            eprintln!(
                "receiving on {} over {}",
                listener.local_addr()?,
                transport.name()
            );
            let dest = demo::DemoDestination::new(&cfg.layout, &cfg.devices)?
                .limits(limits)
                .transport(transport);
            if dest_args.prealloc {
                let took = dest.prealloc()?;
                eprintln!(
                    "guest RAM allocated up front in {:.0} ms",
                    took.as_secs_f64() * 1000.0
                );
            }
            let report = dest.run(
                &listener,
                cfg.engine.retries + 1,
                Duration::from_secs(accept_timeout),
            )?;
            let text = if guest.json {
                serde_json::to_string_pretty(&report)? + "\n"
            } else {
                format!(
                    "{}: over {}, {} session(s) ({} stream(s) in the last), {} refused connection(s), {} pages received, {} mismatched, {} duplicate(s), resumed: {}, device state restored: {}{}\n",
                    if report.verified && report.resumed { "VERIFIED" } else { "NOT VERIFIED" },
                    report.transport,
                    report.sessions,
                    report.streams,
                    report.refused_connections,
                    report.pages_received,
                    report.mismatched_pages,
                    report.duplicate_pages_received,
                    report.resumed,
                    report.device_state_restored,
                    report
                        .handover_refused
                        .as_ref()
                        .map(|why| format!(", the source refused the handover: {why}"))
                        .unwrap_or_default()
                )
            };
            if !emit(&text)? {
                return Ok(ExitCode::from(EXIT_BROKEN_PIPE));
            }
            return Ok(if report.verified && report.resumed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
    };
    if !emit(&summary_text(&summary, json, local)?)? {
        return Ok(ExitCode::from(EXIT_BROKEN_PIPE));
    }
    if summary.downtime_exceeded {
        eprintln!(
            "warning: downtime {:.1} ms exceeded the {} ms budget (stop-and-copy began: {})",
            summary.downtime_ms, summary.downtime_budget_ms, summary.switchover_reason
        );
    }
    Ok(if summary.verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
