//! `iovatrack plan`.

use clap::{Args, ValueEnum};
use iovatrack::device::{DmaLogger, EmulatedDevice};
use iovatrack::layout::{self, presets, Layout};
use iovatrack::plan::limits::{DeviceLimits, DeviceProfile};
use iovatrack::plan::{Plan, Planner, Strategy};
use iovatrack::range::{human_bytes, IovaRange};
use serde_json::json;
use std::process::ExitCode;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

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

/// Arguments of `iovatrack plan`.
#[derive(Args)]
pub struct PlanArgs {
    /// Layout file: QEMU `info mtree -f` text or JSON (`-` reads standard input). Default:
    /// the embedded q35 16 GiB preset.
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
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_ranges: u32,
    /// Tracking page size in bytes (default: the host page size).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    page_size: Option<u64>,
    /// Host page size: sections are aligned inward to it.
    #[arg(long, value_name = "BYTES", default_value = "4096", value_parser = parse_size)]
    host_page_size: u64,
    /// Plan for a device profile and show what the emulated device does with the plan.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Override the device's own range maximum.
    #[arg(long, value_name = "N", requires = "device")]
    device_max_ranges: Option<u32>,
    /// Override mlx5's tracked-total ceiling, as log2 bytes (default 42).
    #[arg(long, value_name = "LOG2", requires = "device")]
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
    /// Also draw the address space, sections and tracked ranges as SVG.
    #[arg(long, value_name = "FILE")]
    svg: Option<String>,
}

/// Sizes as plain bytes, hex, or with a K/M/G suffix (binary).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M') => (&t[..t.len() - 1], 1 << 20),
        Some('G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    let v = match num.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => num.parse(),
    }
    .map_err(|_| format!("{s:?} is not a size (bytes, 0x hex, or with K/M/G)"))?;
    v.checked_mul(mul)
        .ok_or_else(|| format!("{s:?} is too large"))
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

fn limits(a: &PlanArgs) -> Option<DeviceLimits> {
    let mut l = match a.device? {
        DeviceArg::Generic => DeviceProfile::Generic.limits(),
        DeviceArg::Mlx5 => DeviceProfile::Mlx5.limits(),
        DeviceArg::Pds => DeviceProfile::Pds.limits(),
    };
    if let Some(n) = a.device_max_ranges {
        l.max_ranges = n;
    }
    if let (Some(m), Some((lo, _))) = (a.device_max_span_log2, l.addr_space_log2) {
        l.addr_space_log2 = Some((lo, m));
    }
    Some(l)
}

/// What the emulated device does at START with the plan's ranges.
struct DeviceRun {
    name: &'static str,
    result: Result<(u64, Vec<IovaRange>), iovatrack::device::DeviceError>,
}

fn run_device(l: DeviceLimits, plan: &Plan, name: &'static str) -> DeviceRun {
    let dev = EmulatedDevice::new(l).named(name);
    let result = dev
        .start(plan.page_size, &plan.ranges)
        .map(|ps| (ps, dev.tracked_ranges().unwrap_or_default()));
    let _ = dev.stop();
    DeviceRun { name, result }
}

/// The vIOMMU blocker stays a blocker for a plan from the memory map; the CLI says what
/// handles it.
fn viommu_hint(e: iovatrack::plan::PlanError) -> String {
    format!(
        "{e}\n  hint: live migration can track it in IOVA space (iovatrack migrate --viommu): ranges planned over the mapped IOVAs plus headroom, logging re-armed when a map falls outside them (the window marked dirty), each unmap queried first, every reported bit translated to its guest page\n  hint: --allow-viommu plans the IOMMU regions whole instead"
    )
}

/// Run `iovatrack plan`.
pub fn run(a: PlanArgs) -> Result<ExitCode, BoxError> {
    if a.list_presets {
        for (n, d) in presets::list() {
            println!("{n:16} {d}");
        }
        return Ok(ExitCode::SUCCESS);
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
    let dev_limits = limits(&a);
    if let Some(l) = dev_limits {
        planner = planner.device(l);
    }
    let plan = match planner.plan(&layout) {
        Err(e @ iovatrack::plan::PlanError::Viommu(_)) => return Err(viommu_hint(e).into()),
        other => other?,
    };
    let compare: Vec<Plan> = Strategy::ALL
        .iter()
        .filter_map(|s| planner.clone().strategy(*s).plan(&layout).ok())
        .collect();
    let device = dev_limits.map(|l| {
        let name = match a.device {
            Some(DeviceArg::Mlx5) => "emulated mlx5",
            Some(DeviceArg::Pds) => "emulated pds",
            _ => "emulated generic",
        };
        run_device(l, &plan, name)
    });
    if let Some(path) = &a.svg {
        let doc = crate::svg::render(&layout, &plan, &compare, &source);
        std::fs::write(path, doc).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(
                &plan,
                &compare,
                device.as_ref(),
                &layout,
                &source,
                planner.effective_max_ranges()
            ))?
        );
    } else {
        print_table(
            &plan,
            &compare,
            device.as_ref(),
            &layout,
            &source,
            planner.effective_max_ranges(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn ranges_json(r: &[IovaRange]) -> serde_json::Value {
    r.iter()
        .map(|r| json!({ "iova": r.iova, "length": r.length }))
        .collect()
}

fn to_json(
    plan: &Plan,
    compare: &[Plan],
    dev: Option<&DeviceRun>,
    layout: &Layout,
    source: &str,
    cap: u32,
) -> serde_json::Value {
    let mut v = json!({
        "page_size": plan.page_size,
        "strategy": plan.strategy.as_str(),
        "ranges": ranges_json(&plan.ranges),
        "dma_bytes": plan.dma_bytes,
        "tracked_bytes": plan.tracked_bytes,
        "sections": plan.sections,
        "overhead_bytes": plan.overhead_bytes(),
        "overlapping": plan.overlapping,
        "max_ranges": cap,
        "address_space": layout.address_space(),
        "source": source,
        "skipped": plan.skipped.iter().map(|s| json!({
            "name": s.name, "start": s.start, "last": s.last, "reason": s.reason
        })).collect::<Vec<_>>(),
        "compare": compare.iter().map(|p| json!({
            "strategy": p.strategy.as_str(), "ranges": p.ranges.len(), "tracked_bytes": p.tracked_bytes,
            "overlapping": p.overlapping,
        })).collect::<Vec<_>>(),
    });
    if let (Some(d), Some(view)) = (dev, plan.device.as_ref()) {
        v["device"] = match &d.result {
            Ok((ps, tracked)) => json!({
                "name": d.name, "limits": view.limits, "accepted": true, "page_size": ps,
                "merged": tracked.len() < plan.ranges.len(),
                "tracked_ranges": ranges_json(tracked),
                "tracked_bytes": tracked.iter().map(|r| r.length as u128).sum::<u128>(),
            }),
            Err(e) => json!({
                "name": d.name, "limits": view.limits, "accepted": false,
                "errno": e.errno.name().unwrap_or("?"), "error": e.to_string(),
                "prediction": view.outcome,
            }),
        };
    }
    v
}

fn print_table(
    plan: &Plan,
    compare: &[Plan],
    dev: Option<&DeviceRun>,
    layout: &Layout,
    source: &str,
    cap: u32,
) {
    println!(
        "Layout   {source}: address space {:?}, {} sections, {} of RAM",
        layout.address_space(),
        layout.sections().len(),
        human_bytes(layout.ram_bytes())
    );
    println!(
        "Plan     {} strategy, {} range(s) (cap {cap}), page size {}",
        plan.strategy.as_str(),
        plan.ranges.len(),
        human_bytes(plan.page_size as u128)
    );
    println!();
    println!(
        "  {:>3}  {:>18}  {:>18}  {:>12}",
        "#", "iova", "last", "length"
    );
    for (i, r) in plan.ranges.iter().enumerate() {
        println!(
            "  {:>3}  {:#018x}  {:#018x}  {:>12}",
            i,
            r.iova,
            r.last().unwrap_or(r.iova),
            human_bytes(r.length as u128)
        );
    }
    println!();
    let pct = |a: u128, b: u128| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    println!(
        "  DMA-able  {:>12}  ({} of {} sections)",
        human_bytes(plan.dma_bytes),
        plan.sections.tracked,
        plan.sections.total
    );
    println!(
        "  tracked   {:>12}  (overhead {}, {:.3}% of tracked)",
        human_bytes(plan.tracked_bytes),
        human_bytes(plan.overhead_bytes()),
        pct(plan.overhead_bytes(), plan.tracked_bytes)
    );
    if plan.overlapping {
        println!("  note: ranges overlap (QEMU's buckets do); the kernel refuses overlapping ranges with EINVAL");
    }
    if !plan.skipped.is_empty() {
        println!();
        println!("Skipped sections");
        for s in &plan.skipped {
            println!(
                "  {:#018x}-{:#018x}  {:>10}  {:<32} {}",
                s.start,
                s.last,
                human_bytes(s.last as u128 - s.start as u128 + 1),
                truncate(&s.name, 32),
                s.reason.describe()
            );
        }
    }
    println!();
    println!("Strategies compared");
    for p in compare {
        let mark = if p.strategy == plan.strategy {
            "*"
        } else {
            " "
        };
        println!(
            " {mark} {:<12} {:>4} range(s)  tracked {:>12}  overhead {:>12}{}",
            p.strategy.as_str(),
            p.ranges.len(),
            human_bytes(p.tracked_bytes),
            human_bytes(p.overhead_bytes()),
            if p.overlapping { "  (overlapping)" } else { "" }
        );
    }
    if let Some(d) = dev {
        println!();
        match &d.result {
            Ok((ps, tracked)) => {
                let total: u128 = tracked.iter().map(|r| r.length as u128).sum();
                println!(
                    "Device   {}: START accepted, page size {}",
                    d.name,
                    human_bytes(*ps as u128)
                );
                if tracked.len() < plan.ranges.len() {
                    println!("  the driver merged {} ranges into {} (smallest gaps first); it tracks {} (+{} over the plan)", plan.ranges.len(), tracked.len(), human_bytes(total), human_bytes(total.saturating_sub(plan.tracked_bytes)));
                    for r in tracked {
                        println!(
                            "    {:#018x}-{:#018x}  {:>12}",
                            r.iova,
                            r.last().unwrap_or(r.iova),
                            human_bytes(r.length as u128)
                        );
                    }
                } else {
                    println!(
                        "  tracks the plan as given: {} range(s), {}",
                        tracked.len(),
                        human_bytes(total)
                    );
                }
            }
            Err(e) => println!("Device   {}: START REFUSED: {e}", d.name),
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
