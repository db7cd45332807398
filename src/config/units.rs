//! Units the config file speaks: durations (`"10s"`), byte rates (`"10 MiB/s"`) and port
//! specifications (`443` or `"8000-8100"`). Each parses once, at load, into a typed value so
//! nothing downstream handles strings.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A duration written as a human string such as `"250ms"`, `"10s"` or `"5m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(HumanDuration).map_err(|e| {
            de::Error::custom(format!("invalid duration {s:?} ({e}); write e.g. \"10s\", \"250ms\", \"5m\""))
        })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A byte rate per second. Written as an integer (bytes per second) or a string with a unit:
/// `"500 KB/s"` (SI, powers of 1000) or `"10 MiB/s"` (binary, powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRate(pub u64);

impl ByteRate {
    /// Bytes per second.
    pub fn bytes_per_sec(self) -> u64 {
        self.0
    }

    /// Parses `"10 MiB/s"`, `"10MiB"`, `"1.5 GB/s"`, `"4096"`.
    pub fn parse(input: &str) -> Result<ByteRate, String> {
        let s = input.trim();
        let s = s.strip_suffix("/s").unwrap_or(s).trim_end();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("invalid byte rate {input:?}: expected a number and a unit, e.g. \"10 MiB/s\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "invalid byte rate {input:?}: unknown unit {other:?} (use B, KB, KiB, MB, MiB, GB or GiB, per second)"
                ));
            }
        };
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
            return Err(format!("invalid byte rate {input:?}: must be at least 1 byte per second"));
        }
        Ok(ByteRate(bytes.round() as u64))
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (size, name) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{} {name}/s", self.0 / size);
            }
        }
        write!(f, "{} B/s", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteRate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte rate such as \"10 MiB/s\" or an integer number of bytes per second")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteRate, E> {
                if v < 1 {
                    return Err(E::custom("a byte rate must be at least 1 byte per second"));
                }
                Ok(ByteRate(v as u64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteRate, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteRate, E> {
                ByteRate::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One entry of `policy.allowed_ports`: a port (`443`) or an inclusive range (`"8000-8100"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port allowed.
    pub start: u16,
    /// Last port allowed (inclusive).
    pub end: u16,
}

impl PortRange {
    /// True when `port` is inside the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        fn port<E: de::Error>(v: i64) -> Result<u16, E> {
            match u16::try_from(v) {
                Ok(p) if p != 0 => Ok(p),
                _ => Err(E::custom(format!("port {v} is out of range (1-65535)"))),
            }
        }
        impl Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a range \"FIRST-LAST\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                let p = port(v)?;
                Ok(PortRange { start: p, end: p })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_i64(v.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                let bad = || E::custom(format!("invalid port range {v:?}: write \"FIRST-LAST\""));
                let (a, b) = v.split_once('-').ok_or_else(bad)?;
                let a: i64 = a.trim().parse().map_err(|_| bad())?;
                let b: i64 = b.trim().parse().map_err(|_| bad())?;
                let (start, end) = (port(a)?, port(b)?);
                if start > end {
                    return Err(bad());
                }
                Ok(PortRange { start, end })
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.start == self.end {
            s.serialize_u16(self.start)
        } else {
            s.serialize_str(&format!("{}-{}", self.start, self.end))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_rates_parse_in_both_unit_systems() {
        assert_eq!(ByteRate::parse("10 MiB/s").unwrap().0, 10 << 20);
        assert_eq!(ByteRate::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(ByteRate::parse("500 KB/s").unwrap().0, 500_000);
        assert_eq!(ByteRate::parse("1.5 GB/s").unwrap().0, 1_500_000_000);
        assert_eq!(ByteRate::parse("4096").unwrap().0, 4096);
        assert!(ByteRate::parse("10 parsecs/s").is_err());
        assert!(ByteRate::parse("0").is_err());
        assert!(ByteRate::parse("fast").is_err());
        assert_eq!(ByteRate(4 << 20).to_string(), "4 MiB/s");
    }
}
