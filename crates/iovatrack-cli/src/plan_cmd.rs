//! `iovatrack plan`: arguments in, the library's [`PlanReport`] out as a table, JSON or SVG.

use crate::output::{emit, EXIT_BROKEN_PIPE};
use clap::{Args, ValueEnum};
use iovatrack::layout::{self, parse_size, presets, Layout};
use iovatrack::plan::limits::{DeviceLimits, DeviceProfile};
use iovatrack::plan::report::{DeviceResult, PlanReport};
use iovatrack::plan::{Planner, Strategy};
use iovatrack::range::human_bytes;
use std::fmt::Write as _;
use std::process::ExitCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Exit status when the device refuses START: the plan was printed, but cannot be used.
const EXIT_START_REFUSED: u8 = 3;
/// `--help` text on exit statuses.
pub const EXIT_STATUS_HELP: &str =
    "Exit status: 0 plan printed (and, with --device, START accepted); \
2 bad input or arguments; 3 the device refused START (the plan and the refusal are still \
printed); 141 standard output was closed early (e.g. piped into head).";

#[derive(Clone, Copy, ValueEnum)]
enum StrategyArg {
    Optimal,
    /// QEMU 8.0 to 10.x as released (read-only RAM kept).
    Qemu,
    /// QEMU with the readonly-bypass patch (read-only sections skipped).
    QemuBypassRo,
    PerSection,
    Single,
}

impl From<StrategyArg> for Strategy {
    fn from(s: StrategyArg) -> Self {
        match s {
            StrategyArg::Optimal => Strategy::Optimal,
            StrategyArg::Qemu => Strategy::Qemu,
            StrategyArg::QemuBypassRo => Strategy::QemuBypassRo,
            StrategyArg::PerSection => Strategy::PerSection,
            StrategyArg::Single => Strategy::Single,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Generic,
    Mlx5,
    Pds,
}

impl DeviceArg {
    fn profile(self) -> (DeviceProfile, &'static str) {
        match self {
            DeviceArg::Generic => (DeviceProfile::Generic, "emulated generic"),
            DeviceArg::Mlx5 => (DeviceProfile::Mlx5, "emulated mlx5"),
            DeviceArg::Pds => (DeviceProfile::Pds, "emulated pds"),
        }
    }
}

/// Arguments of `iovatrack plan`.
#[derive(Args)]
#[command(after_help = EXIT_STATUS_HELP)]
pub struct PlanArgs {
    /// Layout file: QEMU `info mtree -f` text or JSON (`-` reads standard input; a `.json`
    /// file is always read as JSON). Default: the embedded q35 16 GiB preset.
    layout: Option<String>,
    /// Query a live QEMU over its QMP UNIX socket instead of reading a file.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["layout", "preset"])]
    qmp: Option<String>,
    /// Use an embedded layout (see --list-presets).
    #[arg(long, conflicts_with = "layout")]
    preset: Option<String>,
    /// List the embedded layouts and exit.
    #[arg(long)]
    list_presets: bool,
    /// Address space whose flat view the container uses (mtree input).
    #[arg(long, value_name = "AS", default_value = "memory")]
    address_space: String,
    /// How ranges are computed.
    #[arg(long, value_enum, default_value = "optimal")]
    strategy: StrategyArg,
    /// Most ranges the optimal plan may use (the kernel takes 256 on 4 KiB hosts).
    #[arg(long, default_value_t = 256, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_ranges: u32,
    /// Tracking page size in bytes, e.g. 4096, 2M, 0x200000 (default: the host page size).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    page_size: Option<u64>,
    /// Host page size: sections are aligned inward to it.
    #[arg(long, value_name = "BYTES", default_value = "4096", value_parser = parse_size)]
    host_page_size: u64,
    /// Plan for a device profile and show what the emulated device does with the plan.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Override the device's own range maximum (at least 1).
    #[arg(long, value_name = "N", requires = "device",
          value_parser = clap::value_parser!(u32).range(1..))]
    device_max_ranges: Option<u32>,
    /// Override mlx5's tracked-total ceiling, as log2 bytes, 12..=64 (default 42).
    #[arg(long, value_name = "LOG2", requires = "device",
          value_parser = clap::value_parser!(u8).range(12..=64))]
    device_max_span_log2: Option<u8>,
    /// Track ram_device sections (P2P targets, other devices' BARs).
    #[arg(long)]
    include_ram_device: bool,
    /// Track read-only sections.
    #[arg(long)]
    include_readonly: bool,
    /// Waive the vIOMMU migration blocker and track IOMMU regions whole.
    #[arg(long)]
    allow_viommu: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also draw the address space, sections, every strategy's ranges and (with --device)
    /// what the device tracks, as SVG (`-`: to standard output instead of the plan).
    #[arg(long, value_name = "FILE")]
    svg: Option<String>,
}

fn load(a: &PlanArgs) -> Result<(Layout, String), BoxError> {
    if let Some(p) = &a.qmp {
        return Ok((layout::qmp::load(p, &a.address_space)?, format!("qmp:{p}")));
    }
    if let Some(f) = &a.layout {
        return Ok((layout::load_file(f, Some(&a.address_space))?, f.clone()));
    }
    let name = a.preset.as_deref().unwrap_or(presets::DEFAULT);
    let text =
        presets::text(name).ok_or_else(|| layout::LoadError::UnknownPreset(name.to_string()))?;
    let l = layout::mtree::parse(text, &a.address_space).map_err(layout::LoadError::from)?;
    Ok((l, format!("preset:{name}")))
}

/// The device's limits with the overrides applied, and its display name.
fn device(a: &PlanArgs) -> Result<Option<(DeviceLimits, &'static str)>, BoxError> {
    let Some(arg) = a.device else {
        return Ok(None);
    };
    let (profile, name) = arg.profile();
    let mut l = profile.limits();
    if let Some(n) = a.device_max_ranges {
        l.max_ranges = n;
    }
    if let Some(m) = a.device_max_span_log2 {
        let Some((lo, _)) = l.addr_space_log2 else {
            return Err(format!(
                "--device-max-span-log2: the {name} profile has no tracked-total ceiling (only mlx5 has one)"
            )
            .into());
        };
        l.addr_space_log2 = Some((lo, m));
    }
    Ok(Some((l, name)))
}

/// What the operator can do about an error: the vIOMMU blocker stays a blocker for a plan
/// from the memory map, and the CLI says what handles it (the library names no flag).
pub fn hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    match e.downcast_ref::<iovatrack::plan::PlanError>()? {
        iovatrack::plan::PlanError::Viommu(_) => Some(
            "live migration can track it in IOVA space (iovatrack migrate --viommu): ranges planned over the mapped IOVAs plus headroom, logging re-armed when a map falls outside them (the window marked dirty), each unmap queried first, every reported bit translated to its guest page; --allow-viommu plans the IOMMU regions whole instead",
        ),
        _ => None,
    }
}

/// Run `iovatrack plan`.
pub fn run(a: PlanArgs) -> Result<ExitCode, BoxError> {
    let mut out = String::new();
    if a.list_presets {
        for (n, d) in presets::list() {
            let _ = writeln!(out, "{n:16} {d}");
        }
        return Ok(match emit(&out)? {
            true => ExitCode::SUCCESS,
            false => ExitCode::from(EXIT_BROKEN_PIPE),
        });
    }
    let (layout, source) = load(&a)?;
    let mut planner = Planner::new()
        .strategy(a.strategy.into())
        .max_ranges(a.max_ranges)
        .host_page_size(a.host_page_size)
        .include_ram_device(a.include_ram_device)
        .include_readonly(a.include_readonly)
        .allow_viommu(a.allow_viommu);
    if let Some(p) = a.page_size {
        planner = planner.page_size(p);
    }
    let report = PlanReport::new(&layout, &source, &planner, device(&a)?)?;
    // `--svg -` puts the picture on standard output in place of the plan.
    match a.svg.as_deref() {
        Some("-") => out.push_str(&crate::svg::render(&layout, &report)),
        Some(path) => std::fs::write(path, crate::svg::render(&layout, &report))
            .map_err(|e| format!("cannot write {path}: {e}"))?,
        None => {}
    }
    if a.svg.as_deref() != Some("-") {
        if a.json {
            out.push_str(&serde_json::to_string_pretty(&report)?);
            out.push('\n');
        } else {
            print_table(&mut out, &report);
        }
    }
    if !emit(&out)? {
        return Ok(ExitCode::from(EXIT_BROKEN_PIPE));
    }
    Ok(if report.start_refused() {
        ExitCode::from(EXIT_START_REFUSED)
    } else {
        ExitCode::SUCCESS
    })
}

/// The plan as the human table.
fn print_table(out: &mut String, r: &PlanReport) {
    let mut line = |l: std::fmt::Arguments<'_>| {
        let _ = writeln!(out, "{l}");
    };
    line(format_args!(
        "Layout   {}: address space {:?}, {} sections, {} of RAM",
        r.source,
        r.address_space,
        r.sections.total,
        human_bytes(r.ram_bytes)
    ));
    line(format_args!(
        "Plan     {} strategy, {} range(s) (cap {}), page size {}",
        r.strategy.as_str(),
        r.ranges.len(),
        r.max_ranges,
        human_bytes(u128::from(r.page_size))
    ));
    line(format_args!(""));
    line(format_args!(
        "  {:>3}  {:>18}  {:>18}  {:>12}",
        "#", "iova", "last", "length"
    ));
    for (i, x) in r.ranges.iter().enumerate() {
        line(format_args!(
            "  {:>3}  {:#018x}  {:#018x}  {:>12}",
            i,
            x.iova,
            x.last().unwrap_or(x.iova),
            human_bytes(u128::from(x.length))
        ));
    }
    line(format_args!(""));
    let pct = |a: u128, b: u128| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    line(format_args!(
        "  DMA-able  {:>12}  ({} of {} sections)",
        human_bytes(r.dma_bytes),
        r.sections.tracked,
        r.sections.total
    ));
    line(format_args!(
        "  tracked   {:>12}  (overhead {}, {:.3}% of tracked)",
        human_bytes(r.tracked_bytes),
        human_bytes(r.overhead_bytes),
        pct(r.overhead_bytes, r.tracked_bytes)
    ));
    if r.overlapping {
        line(format_args!("  note: ranges overlap (QEMU's buckets do); the kernel refuses overlapping ranges with EINVAL"));
    }
    if !r.skipped.is_empty() {
        line(format_args!(""));
        line(format_args!("Skipped sections"));
        for s in &r.skipped {
            line(format_args!(
                "  {:#018x}-{:#018x}  {:>10}  {:<32} {}",
                s.start,
                s.last,
                human_bytes(u128::from(s.last) - u128::from(s.start) + 1),
                truncate(&s.name, 32),
                s.reason.describe()
            ));
        }
    }
    line(format_args!(""));
    line(format_args!("Strategies compared"));
    for p in &r.compare {
        let mark = if p.strategy == r.strategy { "*" } else { " " };
        line(format_args!(
            " {mark} {:<12} {:>4} range(s)  tracked {:>12}  overhead {:>12}{}",
            p.strategy.as_str(),
            p.ranges,
            human_bytes(p.tracked_bytes),
            human_bytes(p.overhead_bytes),
            if p.overlapping { "  (overlapping)" } else { "" }
        ));
    }
    let Some(d) = &r.device else {
        return;
    };
    line(format_args!(""));
    match &d.result {
        DeviceResult::Accepted {
            page_size,
            merged,
            tracked_ranges,
            tracked_bytes,
        } => {
            line(format_args!(
                "Device   {}: START accepted, page size {}",
                d.name,
                human_bytes(u128::from(*page_size))
            ));
            if *merged {
                line(format_args!(
                    "  the driver merged {} ranges into {} (smallest gaps first); it tracks {} (+{} over the plan)",
                    r.ranges.len(),
                    tracked_ranges.len(),
                    human_bytes(*tracked_bytes),
                    human_bytes(tracked_bytes.saturating_sub(r.tracked_bytes))
                ));
                for x in tracked_ranges {
                    line(format_args!(
                        "    {:#018x}-{:#018x}  {:>12}",
                        x.iova,
                        x.last().unwrap_or(x.iova),
                        human_bytes(u128::from(x.length))
                    ));
                }
            } else {
                line(format_args!(
                    "  tracks the plan as given: {} range(s), {}",
                    tracked_ranges.len(),
                    human_bytes(*tracked_bytes)
                ));
            }
        }
        DeviceResult::Refused { error, .. } => {
            line(format_args!("Device   {}: START REFUSED: {error}", d.name));
            line(format_args!(
                "  this plan cannot be used with this device (exit status {EXIT_START_REFUSED})"
            ));
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let t: String = s.chars().take(n - 1).collect();
        format!("{t}…")
    }
}
