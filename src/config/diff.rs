//! What a reload changed, as dotted key names (`limits.max_tunnels`, `log.format`): the one
//! line a reload logs lists them, and the keys the running proxy cannot apply (its listeners)
//! are named apart. Only names are ever produced, never values, so a changed password file
//! path or a key under `[auth]` shows as a name and nothing else.

use super::Config;

/// The keys that differ between two configurations, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Every changed key, dotted; a whole section when it was added or removed (`auth`), a
    /// whole list when any element changed (`routes`, `policy.allowed_ports`).
    pub keys: Vec<String>,
}

impl Changes {
    /// The keys that differ from `old` to `new`.
    pub fn between(old: &Config, new: &Config) -> Changes {
        let mut keys = Vec::new();
        match (toml::Value::try_from(old), toml::Value::try_from(new)) {
            (Ok(a), Ok(b)) => walk("", &a, &b, &mut keys),
            // Config always serialises (check-config prints it); were it not to, say so
            // rather than claim nothing changed.
            _ => keys.push("(unknown)".to_string()),
        }
        Changes { keys }
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `key` is among the changes.
    pub fn contains(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }

    /// Changed keys that take effect only after a restart: listener addresses (`[server]`
    /// keys ending in `listen`), which are bound once at start-up.
    pub fn need_restart(&self) -> Vec<&str> {
        self.keys.iter().map(String::as_str).filter(|k| needs_restart(k)).collect()
    }

    /// Changed keys a reload applies.
    pub fn applied(&self) -> Vec<&str> {
        self.keys.iter().map(String::as_str).filter(|k| !needs_restart(k)).collect()
    }
}

fn needs_restart(key: &str) -> bool {
    key.strip_prefix("server.").is_some_and(|k| k.rsplit('.').next().is_some_and(|last| last.ends_with("listen")))
}

fn walk(path: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match (a, b) {
        (toml::Value::Table(ta), toml::Value::Table(tb)) => {
            for (k, va) in ta {
                match tb.get(k) {
                    Some(vb) => walk(&join(k), va, vb, out),
                    None => out.push(join(k)),
                }
            }
            out.extend(tb.keys().filter(|k| !ta.contains_key(*k)).map(|k| join(k)));
        }
        _ if a != b => out.push(path.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        Config::from_toml(toml, "test").unwrap()
    }

    #[test]
    fn changed_keys_are_named_and_listeners_need_a_restart() {
        let old = config("[log]\nformat = \"text\"\n");
        let new = config(
            "[server]\nlisten = [\"127.0.0.1:1\"]\n[limits]\nmax_tunnels = 5\n[log]\nformat = \"json\"\n\
             [policy]\nallowed_ports = [443, 8443]\n",
        );
        let c = Changes::between(&old, &new);
        assert_eq!(c.keys, ["limits.max_tunnels", "log.format", "policy.allowed_ports", "server.listen"]);
        assert_eq!(c.need_restart(), ["server.listen"]);
        assert_eq!(c.applied(), ["limits.max_tunnels", "log.format", "policy.allowed_ports"]);
        assert!(Changes::between(&old, &old).is_empty());
    }

    #[test]
    fn an_added_section_is_named_without_its_values() {
        let old = config("");
        let new = config("[dns.hosts]\n\"a.test\" = \"127.0.0.1\"\n");
        let c = Changes::between(&old, &new);
        assert_eq!(c.keys, ["dns.hosts.a.test"]);
        assert!(!format!("{c:?}").contains("127.0.0.1"));
    }
}
