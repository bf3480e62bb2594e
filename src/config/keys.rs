//! Every single-valued configuration key, once: its name in files and `cvm config show`, its
//! `CVM_*` variable, how its text is read and how its value is shown. Files, the environment
//! and `cvm config show` all go through [`KEYS`], and a test holds the README's key list to it;
//! a flag sets the same `Settings` field, typed by clap with the same parser. So a new key is
//! one entry here, one `Settings` field and, if it has one, its flag.
//!
//! Lists and tables (`network.allow`, `[[mounts]]`, `[tools]`, `[secrets]`...) have shapes of
//! their own and are read in `mod.rs`.

use std::time::Duration;

use super::{enum_name, parse_enum, Settings, Source, VmmChoice};
use crate::network::egress::NetworkMode;

/// One single-valued key.
pub struct Key {
    /// As files and `cvm config show` write it: `vm.cpus`.
    pub name: &'static str,
    /// The variable that sets it, if one does.
    pub env: Option<&'static str>,
    /// A value it takes, other than its default (for the docs and the tests).
    pub example: &'static str,
    /// Reads `text` (a file's value, a variable's) and sets the key from `source`.
    pub set: fn(&mut Settings, &str, Source) -> Result<(), String>,
    /// The value as `cvm config show` writes it, and the layers that made it.
    pub show: fn(&Settings) -> (String, &[Source]),
}

/// A key of `Settings` field `$field`: its text read by `$parse`, its value shown by `$show`.
macro_rules! key {
    ($name:literal, $env:expr, $example:literal, $field:ident, $parse:expr, $show:expr) => {
        Key {
            name: $name,
            env: $env,
            example: $example,
            set: |settings, text, source| {
                settings.$field.set(($parse)(text)?, source);
                Ok(())
            },
            show: |settings| (($show)(&settings.$field.value), &settings.$field.sources),
        }
    };
}

pub const KEYS: &[Key] = &[
    key!("vm.cpus", Some("CVM_CPUS"), "4", cpus, parse_cpus, |v: &u8| v.to_string()),
    key!("vm.memory", Some("CVM_MEMORY"), "2G", memory, cvm_vmm::parse_memory_size, |v: &u64| format!("\"{}M\"", v >> 20)),
    key!("vm.disk", Some("CVM_DISK"), "8G", disk, |t: &str| cvm_vmm::parse_memory_size(t).map(Some), |v: &Option<u64>| v
        .map_or("none".into(), |d| format!("\"{}M\"", d >> 20))),
    key!("vm.share_quota", Some("CVM_SHARE_QUOTA"), "20G", share_quota, |t: &str| cvm_vmm::parse_memory_size(t).map(Some), |v: &Option<
        u64,
    >| v
        .map_or("\"auto\"".into(), |d| format!("\"{}M\"", d >> 20))),
    key!("vm.vmm", Some("CVM_VMM"), "qemu", vmm, |t: &str| parse_enum::<VmmChoice>(t, "vmm"), |v: &VmmChoice| format!(
        "{:?}",
        enum_name(v)
    )),
    key!("vm.image", Some("CVM_IMAGE"), "minimal", image, |t: &str| Ok::<_, String>(t.to_string()), |v: &String| format!("{v:?}")),
    key!("vm.timeout", Some("CVM_TIMEOUT"), "30m", timeout, |t: &str| crate::config::keys::parse_duration(t).map(Some), |v: &Option<
        Duration,
    >| v
        .map_or("none".into(), |t| format!("\"{}s\"", t.as_secs()))),
    key!(
        "network.mode",
        Some("CVM_NETWORK"),
        "none",
        network,
        |t: &str| parse_enum::<NetworkMode>(t, "network mode"),
        |v: &NetworkMode| format!("{:?}", enum_name(v))
    ),
];

/// The key named `name`.
pub fn key(name: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.name == name)
}

/// A vCPU count: 1 to 255.
pub fn parse_cpus(text: &str) -> Result<u8, String> {
    match text.trim().parse::<u8>() {
        Ok(0) => Err("cpus must be at least 1".into()),
        Ok(cpus) => Ok(cpus),
        Err(_) => Err(format!("invalid vCPU count {text:?}: a number from 1 to 255")),
    }
}

/// Parses a duration: a whole number with an optional unit `ms`, `s`, `m` or `h` (bare: s).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("invalid duration {text:?}: expected a number like 30s, 5m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "" | "s" => Duration::from_secs(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        other => return Err(format!("invalid duration {text:?}: unknown unit {other:?} (use ms, s, m or h)")),
    };
    if duration.is_zero() {
        return Err("the duration must be greater than zero".into());
    }
    Ok(duration)
}
