//! The route table: the first `[[routes]]` entry whose pattern matches the target decides the
//! mode and any per-route limits; a target no route names is tunnelled.

use super::pattern::any_matches;
use crate::config::{Mode, RouteConfig};
use crate::target::Target;

/// What the route table decided for one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteMatch<'a> {
    /// Index into the configured routes, when one matched: what the snapshot's per-route
    /// data (`Shared::route_ids`) is looked up by, with no string built per tunnel.
    pub index: Option<usize>,
    /// The route that matched (what it says beyond the mode, such as an egress, is read
    /// from here; its limits are the governor's, by the route's identity).
    pub route: Option<&'a RouteConfig>,
    /// The mode to use: the route's, or `tunnel` when none matched.
    pub mode: Mode,
}

/// Looks `target` up in `routes`.
pub fn lookup<'a>(routes: &'a [RouteConfig], target: &Target) -> RouteMatch<'a> {
    let host = target.host_str();
    routes
        .iter()
        .enumerate()
        .find(|(_, r)| any_matches(&r.hosts, &host))
        .map(|(i, r)| RouteMatch { index: Some(i), route: Some(r), mode: r.mode })
        .unwrap_or(RouteMatch { index: None, route: None, mode: Mode::Tunnel })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pattern::HostPattern;

    #[test]
    fn first_match_wins_and_default_is_tunnel() {
        let routes = vec![
            RouteConfig {
                hosts: vec![HostPattern::parse("a.example").unwrap()],
                mode: Mode::Tunnel,
                per_client: None,
                upstream: None,
                egress: None,
            },
            RouteConfig {
                hosts: vec![HostPattern::parse("*.example").unwrap()],
                mode: Mode::Deny,
                per_client: None,
                upstream: None,
                egress: None,
            },
        ];
        let t = |s: &str| Target::parse(s).unwrap();
        assert_eq!(lookup(&routes, &t("a.example:443")).mode, Mode::Tunnel);
        assert_eq!(lookup(&routes, &t("a.example:443")).index, Some(0));
        assert_eq!(lookup(&routes, &t("b.example:443")).mode, Mode::Deny);
        assert_eq!(lookup(&routes, &t("other:443")).index, None);
        assert_eq!(lookup(&routes, &t("other:443")).mode, Mode::Tunnel);
    }
}
