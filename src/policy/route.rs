//! The route table: the first `[[routes]]` entry whose pattern matches the target decides the
//! mode and any per-route limits; a target no route names is tunnelled.

use super::pattern::any_matches;
use crate::config::{Mode, RouteConfig, RouteLimits};
use crate::target::Target;

/// What the route table decided for one target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteMatch<'a> {
    /// Index into the configured routes, when one matched.
    pub index: Option<usize>,
    /// The route that matched.
    pub route: Option<&'a RouteConfig>,
    /// The mode to use.
    pub mode: Mode,
    /// Per-client limits the route sets, if any.
    pub limits: Option<&'a RouteLimits>,
}

/// Looks `target` up in `routes`.
pub fn lookup<'a>(routes: &'a [RouteConfig], target: &Target) -> RouteMatch<'a> {
    let host = target.host_str();
    routes
        .iter()
        .enumerate()
        .find(|(_, r)| any_matches(&r.hosts, &host))
        .map(|(i, r)| RouteMatch { index: Some(i), route: Some(r), mode: r.mode, limits: r.per_client.as_ref() })
        .unwrap_or(RouteMatch { index: None, route: None, mode: Mode::Tunnel, limits: None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::pattern::HostPattern;

    #[test]
    fn first_match_wins_and_default_is_tunnel() {
        let routes = vec![
            RouteConfig { hosts: vec![HostPattern::parse("a.example").unwrap()], mode: Mode::Tunnel, per_client: None },
            RouteConfig { hosts: vec![HostPattern::parse("*.example").unwrap()], mode: Mode::Deny, per_client: None },
        ];
        let t = |s: &str| Target::parse(s).unwrap();
        assert_eq!(lookup(&routes, &t("a.example:443")).mode, Mode::Tunnel);
        assert_eq!(lookup(&routes, &t("a.example:443")).index, Some(0));
        assert_eq!(lookup(&routes, &t("b.example:443")).mode, Mode::Deny);
        assert_eq!(lookup(&routes, &t("other:443")).index, None);
        assert_eq!(lookup(&routes, &t("other:443")).mode, Mode::Tunnel);
    }
}
