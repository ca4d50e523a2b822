use super::*;

const GOOD: &str = r#"
[listeners.web]
bind = "127.0.0.1:8080"

[[listeners.web.routes]]
upstream = "app"

[upstreams.app]
servers = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 3 }]
"#;

fn error_text(text: &str) -> String {
    parse("test.toml", text).unwrap_err().to_string()
}

#[test]
fn good_config_validates_with_defaults() {
    let c = parse("test.toml", GOOD).unwrap();
    assert_eq!(c.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.listeners[0].routes[0].path_prefix, "/");
    assert_eq!(c.upstreams[0].servers[1].weight, 3);
    assert_eq!(c.timeouts.client_header, Duration::from_secs(30));
    assert!(c.access_log.enabled);
}

#[test]
fn unknown_key_names_line_column_and_the_allowed_keys() {
    let text = GOOD.replace("bind =", "bnid =");
    let e = error_text(&text);
    assert!(
        e.starts_with("test.toml:3:1: error: unknown field `bnid`"),
        "{e}"
    );
    assert!(e.contains("`bind`"), "{e}");
}

#[test]
fn semantic_errors_are_all_reported_with_positions() {
    let text = r#"
[listeners.web]
bind = "127.0.0.1:99999"

[[listeners.web.routes]]
upstream = "nope"

[upstreams.app]
balance = "fastest"
servers = [{ address = "localhost", weight = 0, max_connections = 0 }]
"#;
    let e = error_text(text);
    assert!(
        e.contains("test.toml:3:8: error: bind `127.0.0.1:99999` is not an IP address and port"),
        "{e}"
    );
    assert!(e.contains("test.toml:6:12: error: route sends to upstream `nope`, which is not defined (defined: `app`)"), "{e}");
    assert!(e.contains("test.toml:9:11: error: unknown balance algorithm `fastest`: expected one of `round_robin`, `random`, `ip_hash`, `least_connections`, `two_choices`, `least_time`, `consistent_hash`"), "{e}");
    assert!(
        e.contains("test.toml:10:24: error: address `localhost` has no port"),
        "{e}"
    );
    assert!(
        e.contains("error: weight = 0 is out of range: allowed 1 to 1000"),
        "{e}"
    );
    assert!(
        e.contains("error: max_connections = 0 is out of range: allowed 1 to 1000000"),
        "{e}"
    );
}

#[test]
fn duplicates_are_refused() {
    let dup_upstream = format!("{GOOD}\n[upstreams.app]\nservers = []\n");
    assert!(error_text(&dup_upstream).contains("duplicate key"));
    let dup_server = GOOD.replace("127.0.0.1:9002", "127.0.0.1:9001");
    assert!(error_text(&dup_server).contains("server 127.0.0.1:9001 is listed twice"));
    let dup_route = GOOD.replace(
        "upstream = \"app\"",
        "upstream = \"app\"\n[[listeners.web.routes]]\nupstream = \"app\"",
    );
    assert!(error_text(&dup_route).contains("two routes for host (any) and path_prefix `/`"));
}

#[test]
fn bad_durations_and_sizes_say_what_is_allowed() {
    let text = format!("{GOOD}\n[timeouts]\nclient_header = \"soon\"\n[limits]\nmax_headers = 0\n");
    let e = error_text(&text);
    assert!(
        e.contains("client_header = \"soon\" is not a duration"),
        "{e}"
    );
    assert!(
        e.contains("max_headers = 0 is out of range: allowed 8 to 256"),
        "{e}"
    );
}

#[test]
fn empty_config_asks_for_a_listener() {
    assert!(error_text("").contains("no listeners"));
}

#[test]
fn hash_key_is_checked_and_goes_with_consistent_hash_only() {
    let bad_key = GOOD.replace(
        "[upstreams.app]\n",
        "[upstreams.app]\nbalance = \"consistent_hash\"\nhash_key = \"query\"\n",
    );
    assert!(error_text(&bad_key).contains("hash_key `query` is not a key: use \"client_ip\", \"path\", \"header:NAME\" or \"cookie:NAME\""));
    let wrong_balance = GOOD.replace(
        "[upstreams.app]\n",
        "[upstreams.app]\nhash_key = \"path\"\n",
    );
    assert!(
        error_text(&wrong_balance)
            .contains("hash_key applies only with balance = \"consistent_hash\"")
    );
    let good = GOOD.replace(
        "[upstreams.app]\n",
        "[upstreams.app]\nbalance = \"consistent_hash\"\nhash_key = \"cookie:session\"\n",
    );
    let config = parse("test.toml", &good).unwrap();
    assert_eq!(
        config.upstreams[0].hash_key,
        Some(HashKey::Cookie("session".into()))
    );
}

#[test]
fn sticky_cookie_names_are_checked() {
    let bad = GOOD.replace(
        "[upstreams.app]\n",
        "[upstreams.app]\nsticky_cookie = \"a b\"\n",
    );
    assert!(error_text(&bad).contains("sticky_cookie `a b` is not a cookie name"));
    let good = GOOD.replace(
        "[upstreams.app]\n",
        "[upstreams.app]\nsticky_cookie = \"srv_id\"\n",
    );
    assert_eq!(
        parse("test.toml", &good).unwrap().upstreams[0]
            .sticky_cookie
            .as_deref(),
        Some("srv_id")
    );
}

#[test]
fn slow_start_and_fail_timeout_may_be_off_but_must_be_durations() {
    let c = parse("test.toml", GOOD).unwrap();
    assert_eq!(c.upstreams[0].slow_start, Duration::ZERO);
    assert_eq!(c.upstreams[0].fail_timeout, Duration::from_secs(10));
    let text = GOOD.replace(
        "[upstreams.app]",
        "[upstreams.app]\nslow_start = \"30s\"\nfail_timeout = \"0s\"",
    );
    let c = parse("test.toml", &text).unwrap();
    assert_eq!(c.upstreams[0].slow_start, Duration::from_secs(30));
    assert_eq!(c.upstreams[0].fail_timeout, Duration::ZERO);
    let e = error_text(&GOOD.replace("[upstreams.app]", "[upstreams.app]\nslow_start = \"soon\""));
    assert!(
        e.starts_with("test.toml:9:14: error: slow_start = \"soon\" is not a duration"),
        "{e}"
    );
}

/// Every duration key: its table, and its range as errors state it.
const DURATIONS: &[(&str, &str, &str, &str)] = &[
    ("timeouts", "client_header", "1ms", "1h"),
    ("timeouts", "client_idle", "1ms", "1day"),
    ("timeouts", "upstream_connect", "1ms", "5m"),
    ("timeouts", "upstream_response_header", "1ms", "1day"),
    ("timeouts", "upstream_idle", "1ms", "1day"),
    ("timeouts", "shutdown_grace", "1ms", "1h"),
    ("timeouts", "tls_handshake", "1ms", "5m"),
    ("upstreams.app", "latency_decay", "1ms", "1h"),
    ("upstreams.app", "pool_idle_timeout", "1ms", "1h"),
    ("upstreams.app", "slow_start", "0s (off)", "1h"),
    ("upstreams.app", "fail_timeout", "0s (off)", "1h"),
    ("upstreams.app", "try_timeout", "1ms", "1day"),
];

/// `GOOD` with `key = "value"` in `table`.
fn with_duration(table: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = \"{value}\"\n");
    if table == "timeouts" {
        format!("{GOOD}\n[timeouts]\n{line}")
    } else {
        GOOD.replace(&format!("[{table}]\n"), &format!("[{table}]\n{line}"))
    }
}

#[test]
fn every_duration_has_a_range_and_its_ends_are_allowed() {
    for &(table, key, min, max) in DURATIONS {
        let e = error_text(&with_duration(table, key, "100000000000d"));
        assert!(
            e.contains(&format!(
                "{key} = \"100000000000d\" is out of range: allowed {min} to {max}"
            )),
            "{e}"
        );
        let min = min.trim_end_matches(" (off)");
        for end in [min, max] {
            let config = with_duration(table, key, end);
            assert!(parse("test.toml", &config).is_ok(), "{key} = {end}");
        }
        if min != "0s" {
            let e = error_text(&with_duration(table, key, "0s"));
            assert!(
                e.contains(&format!("{key} = \"0s\" is out of range")),
                "{e}"
            );
        }
    }
}

#[test]
fn a_duration_out_of_range_is_shown_where_it_is() {
    let e = error_text(&with_duration("timeouts", "client_header", "100000000000d"));
    assert_eq!(
        e,
        "test.toml:12:17: error: client_header = \"100000000000d\" is out of range: allowed 1ms to 1h\n   \
         12 | client_header = \"100000000000d\"\n      \
         |                 ^^^^^^^^^^^^^^^"
    );
    let e = error_text(&with_duration("upstreams.app", "fail_timeout", "2h"));
    assert!(
        e.starts_with(
            "test.toml:9:16: error: fail_timeout = \"2h\" is out of range: allowed 0s (off) to 1h"
        ),
        "{e}"
    );
}

#[test]
fn the_sticky_secret_goes_to_every_upstream_and_must_be_long_enough() {
    let secret = "0123456789abcdef0123456789abcdef";
    let api = "\n[upstreams.api]\nservers = [{ address = \"127.0.0.1:9003\" }]\n";
    let config = parse(
        "test.toml",
        &format!("sticky_secret = \"{secret}\"\n{GOOD}{api}"),
    )
    .unwrap();
    assert_eq!(config.upstreams.len(), 2);
    for upstream in &config.upstreams {
        assert_eq!(upstream.sticky_secret, StickySecret::new(secret));
    }
    assert_eq!(
        format!("{:?}", config.upstreams[0].sticky_secret),
        "Some(StickySecret(..))"
    );
    assert_eq!(
        parse("test.toml", GOOD).unwrap().upstreams[0].sticky_secret,
        None
    );

    let e = error_text(&format!("sticky_secret = \"{}\"\n{GOOD}", &secret[1..]));
    assert!(
        e.starts_with(
            "test.toml:1:17: error: sticky_secret has 31 characters: it needs at least 32"
        ),
        "{e}"
    );
}

#[test]
fn a_sticky_secret_file_is_read_from_the_config_files_directory() {
    let dir = std::env::temp_dir().join(format!("fulcrum-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let name = dir.join("fulcrum.toml").display().to_string();
    let secret = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.join("secret"), format!("{secret}\n")).unwrap();
    std::fs::write(dir.join("short"), "0123456789\n").unwrap();
    let with = |line: &str| format!("{line}\n{GOOD}");

    let config = parse(&name, &with("sticky_secret_file = \"secret\"")).unwrap();
    assert_eq!(config.upstreams[0].sticky_secret, StickySecret::new(secret));
    let short = parse(&name, &with("sticky_secret_file = \"short\""))
        .unwrap_err()
        .to_string();
    let missing = parse(&name, &with("sticky_secret_file = \"missing\""))
        .unwrap_err()
        .to_string();
    let both = parse(
        &name,
        &with(&format!(
            "sticky_secret = \"{secret}\"\nsticky_secret_file = \"secret\""
        )),
    )
    .unwrap_err()
    .to_string();
    std::fs::remove_dir_all(&dir).unwrap();

    assert!(
        short.contains(&format!(
            ":1:22: error: sticky_secret_file `{}` holds 10 characters: a secret needs at least 32",
            dir.join("short").display()
        )),
        "{short}"
    );
    assert!(
        missing.contains(":1:22: error: sticky_secret_file `"),
        "{missing}"
    );
    assert!(missing.contains("cannot be read"), "{missing}");
    assert!(
        both.contains(":2:22: error: give sticky_secret or sticky_secret_file, not both"),
        "{both}"
    );
}

#[test]
fn health_defaults_are_http_checks_off_outlier_detection_on_and_panic_at_half() {
    let c = parse("test.toml", GOOD).unwrap();
    let up = &c.upstreams[0];
    assert!(up.health_check.is_none());
    assert_eq!(up.outlier_detection, OutlierDetection::default());
    assert!(up.outlier_detection.enabled);
    assert_eq!(up.panic_threshold, 50);

    let text = format!("{GOOD}[upstreams.app.health_check]\npath = \"/healthz\"\n");
    let check = parse("test.toml", &text).unwrap().upstreams[0]
        .health_check
        .clone()
        .unwrap();
    assert_eq!(check.kind, CheckKind::Http);
    assert_eq!(check.interval, Duration::from_secs(5));
    assert_eq!(check.timeout, Duration::from_secs(2));
    assert_eq!(check.jitter, Duration::from_millis(500));
    assert_eq!((check.rise, check.fall), (2, 3));
    assert_eq!(check.method, http::Method::GET);
    assert_eq!(check.path, "/healthz");
    assert_eq!(check.expect_status, vec![(200, 399)]);
    assert_eq!(check.expect_body, None);

    let text = format!(
        "{GOOD}panic_threshold = 0\n[upstreams.app.health_check]\ntype = \"tcp\"\ninterval = \"1s\"\n\
         [upstreams.app.outlier_detection]\nconsecutive_5xx = 0\nbase_ejection_time = \"10s\"\n\
         max_ejection_percent = 100\n"
    );
    let c = parse("test.toml", &text).unwrap();
    let up = &c.upstreams[0];
    assert_eq!(up.panic_threshold, 0);
    let check = up.health_check.as_ref().unwrap();
    assert_eq!(check.kind, CheckKind::Tcp);
    // Half the interval, when 2s would not fit in it.
    assert_eq!(check.timeout, Duration::from_millis(500));
    assert_eq!(up.outlier_detection.consecutive_5xx, 0);
    assert_eq!(up.outlier_detection.consecutive_failures, 5);
    assert_eq!(
        up.outlier_detection.base_ejection_time,
        Duration::from_secs(10)
    );
    assert_eq!(up.outlier_detection.max_ejection_percent, 100);
}

#[test]
fn health_errors_are_located() {
    // GOOD ends on line 9; these start on line 10.
    let text = format!(
        "{GOOD}panic_threshold = 101\n[upstreams.app.health_check]\ninterval = \"1s\"\n\
         timeout = \"1s\"\nrise = 0\nexpect_status = [200, \"399-200\", \"2xx\", 99]\n\
         type = \"udp\"\n"
    );
    let e = error_text(&text);
    for expected in [
        "test.toml:10:19: error: panic_threshold = 101 is out of range: allowed 0 to 100",
        "test.toml:13:11: error: health check timeout (1s) must be shorter than its interval (1s)",
        "test.toml:14:8: error: rise = 0 is out of range: allowed 1 to 1000",
        "test.toml:15:23: error: expect_status entry \"399-200\" is not a status code or range",
        "test.toml:15:34: error: expect_status entry \"2xx\" is not a status code or range",
        "test.toml:15:41: error: expect_status entry 99 is not a status code or range",
        "test.toml:16:8: error: unknown health check type `udp`: expected \"http\", \"tcp\" or \"dns\"",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }

    let text = format!(
        "{GOOD}[upstreams.app.health_check]\ntype = \"tcp\"\npath = \"/x\"\n\
         [upstreams.app.outlier_detection]\nmax_ejection_percent = 0\nbase_ejection_time = \"1m\"\n\
         max_ejection_time = \"30s\"\nconsecutive_errors = 3\n"
    );
    let e = error_text(&text);
    assert!(
        e.contains("test.toml:17:1: error: unknown field `consecutive_errors`"),
        "{e}"
    );
    let text = text.replace("consecutive_errors = 3\n", "");
    let e = error_text(&text);
    for expected in [
        "test.toml:12:8: error: path applies only to type = \"http\" checks",
        "test.toml:14:24: error: max_ejection_percent = 0 is out of range: allowed 1 to 100",
        "test.toml:16:21: error: max_ejection_time must be at least base_ejection_time",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn servers_may_be_given_by_host_name() {
    let text = GOOD.replace(
        r#"{ address = "127.0.0.1:9002", weight = 3 }"#,
        r#"{ address = "Backend.Internal:8080", weight = 3, backup = true, max_connections = 9 }, { address = "app.test.:80" }"#,
    );
    let c = parse("test.toml", &text).unwrap();
    let up = &c.upstreams[0];
    assert_eq!(up.servers.len(), 1);
    assert_eq!(
        up.named,
        [
            NamedServer {
                name: "backend.internal:8080".into(),
                host: "backend.internal".into(),
                port: 8080,
                weight: 3,
                backup: true,
                drain: false,
                max_connections: 9,
            },
            NamedServer {
                name: "app.test.:80".into(),
                host: "app.test.".into(),
                port: 80,
                weight: 1,
                backup: false,
                drain: false,
                max_connections: 10_000,
            },
        ]
    );
    assert_eq!(c.dns.nameservers, []);
    assert_eq!(c.dns.min_ttl, Duration::from_secs(5));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(300));
    assert_eq!(c.dns.timeout, Duration::from_secs(5));

    let names_only = GOOD.replace(
        r#"servers = [{ address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 3 }]"#,
        r#"servers = [{ address = "app.internal:80" }]"#,
    );
    let c = parse("test.toml", &names_only).unwrap();
    assert!(c.upstreams[0].servers.is_empty());
    assert_eq!(c.upstreams[0].named[0].name, "app.internal:80");
}

#[test]
fn listeners_bind_ip_addresses_not_host_names() {
    let e = error_text(&GOOD.replace("127.0.0.1:8080", "localhost:8080"));
    assert!(
        e.contains("test.toml:3:8: error: bind `localhost:8080` is not an IP address and port: write it as 127.0.0.1:8080 or [::]:8080 (host names are only for upstream servers)"),
        "{e}"
    );
}

#[test]
fn bad_host_names_and_ports_are_refused_where_they_are() {
    let with = |address: &str| error_text(&GOOD.replace("127.0.0.1:9002", address));
    let cases = [
        ("back end.internal:80", "`` cannot be in a host name"),
        ("exa!mple.com:80", "`!` cannot be in a host name"),
        ("app..internal:80", "empty label"),
        ("-app.internal:80", "label `-app` starts or ends with `-`"),
        ("10.0.0.300:80", "looks like an IPv4 address but is not one"),
        ("app.internal:0", "has no valid port"),
        ("app.internal:65536", "has no valid port"),
        ("app.internal:http", "has no valid port"),
        ("app.internal", "has no port"),
        ("::1:80", "write an IPv6 address in brackets"),
    ];
    for (address, why) in cases {
        let e = with(address);
        let why = why.replace("``", "` `");
        assert!(
            e.contains(&format!("test.toml:9:56: error: address `{address}`")),
            "{address}: {e}"
        );
        assert!(e.contains(&why), "{address}: {e}");
    }
    let twice = GOOD
        .replace("127.0.0.1:9001", "app.internal:80")
        .replace("127.0.0.1:9002", "APP.internal:80");
    let e = error_text(&twice);
    assert!(
        e.contains(
            "test.toml:9:57: error: server app.internal:80 is listed twice in upstream `app`"
        ),
        "{e}"
    );
}

#[test]
fn dns_section_is_checked() {
    let c = parse(
        "test.toml",
        &format!("{GOOD}\n[dns]\nnameservers = [\"127.0.0.1:5353\", \"10.0.0.2\", \"[::1]:53\"]\nmin_ttl = \"1s\"\nmax_ttl = \"1m\"\ntimeout = \"500ms\"\n"),
    )
    .unwrap();
    let ns: Vec<String> = c.dns.nameservers.iter().map(|a| a.to_string()).collect();
    assert_eq!(ns, ["127.0.0.1:5353", "10.0.0.2:53", "[::1]:53"]);
    assert_eq!(c.dns.min_ttl, Duration::from_secs(1));
    assert_eq!(c.dns.max_ttl, Duration::from_secs(60));
    assert_eq!(c.dns.timeout, Duration::from_millis(500));

    let e = error_text(&format!(
        "{GOOD}\n[dns]\nnameservers = [\"dns.google\"]\nmin_ttl = \"500ms\"\n"
    ));
    assert!(
        e.contains("test.toml:12:16: error: nameserver `dns.google` is not an IP address"),
        "{e}"
    );
    assert!(
        e.contains("test.toml:13:11: error: min_ttl = \"500ms\" is out of range: allowed 1s to 1h"),
        "{e}"
    );
    let e = error_text(&format!(
        "{GOOD}\n[dns]\nmin_ttl = \"10m\"\nmax_ttl = \"1m\"\nnameservers = []\nttl = 3\n"
    ));
    assert!(e.contains("unknown field `ttl`"), "{e}");
    let e = error_text(&format!(
        "{GOOD}\n[dns]\nmin_ttl = \"10m\"\nmax_ttl = \"1m\"\nnameservers = []\n"
    ));
    assert!(
        e.contains("test.toml:13:11: error: max_ttl = \"1m\" is shorter than min_ttl (10m)"),
        "{e}"
    );
    assert!(
        e.contains("test.toml:14:15: error: nameservers is empty"),
        "{e}"
    );
}

#[test]
fn names_over_tls_without_server_name_are_warned_about() {
    let text = format!(
        "{}\n[upstreams.app.tls]\n",
        GOOD.replace("127.0.0.1:9002", "app.internal:443")
    );
    let c = parse("test.toml", &text).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("test.toml:11:1: warning: upstream `app` reaches app.internal:443 over TLS without a server_name"),
        "{}",
        c.warnings[0]
    );
    let named = format!("{text}server_name = \"app.internal\"\n");
    assert!(parse("test.toml", &named).unwrap().warnings.is_empty());
    assert!(
        parse(
            "test.toml",
            &GOOD.replace("127.0.0.1:9002", "app.internal:443")
        )
        .unwrap()
        .warnings
        .is_empty()
    );
}

#[test]
fn retries_and_the_circuit_breaker_have_defaults() {
    let c = parse("test.toml", GOOD).unwrap();
    assert_eq!(c.upstreams[0].resilience, ResilienceConfig::default());
    assert_eq!(c.upstreams[0].resilience.retries, 2);
    assert_eq!(c.upstreams[0].resilience.retry_budget_percent, 20);
    assert_eq!(c.upstreams[0].resilience.retry_budget_min_per_second, 10);
    assert_eq!(c.upstreams[0].resilience.try_timeout, None);
    assert_eq!(c.upstreams[0].resilience.circuit, None);
    let text = GOOD.replace(
        "[upstreams.app]",
        "[upstreams.app]\nretries = 0\ntry_timeout = \"250ms\"\nretry_budget = 50\n\
         retry_budget_min_per_second = 0\nmax_active_requests = 8",
    );
    let r = parse("test.toml", &text).unwrap().upstreams[0]
        .resilience
        .clone();
    assert_eq!(r.retries, 0);
    assert_eq!(r.try_timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        (r.retry_budget_percent, r.retry_budget_min_per_second),
        (50, 0)
    );
    assert_eq!(
        r.circuit,
        Some(CircuitBreaker {
            max_active_requests: 8,
            max_pending_requests: 100,
            queue_timeout: Duration::from_secs(1),
        })
    );
}

#[test]
fn bad_retry_and_circuit_breaker_keys_are_shown_where_they_are() {
    let bad = |keys: &str| {
        error_text(&GOOD.replace("[upstreams.app]", &format!("[upstreams.app]\n{keys}")))
    };
    let e = bad("retries = 11");
    assert!(
        e.starts_with("test.toml:9:11: error: retries = 11 is out of range: allowed 0 to 10"),
        "{e}"
    );
    let e = bad("retry_budget = -5");
    assert!(
        e.starts_with("test.toml:9:16: error: retry_budget = -5 is out of range: allowed 0 to 100"),
        "{e}"
    );
    let e = bad("try_timeout = \"0s\"");
    assert!(
        e.starts_with(
            "test.toml:9:15: error: try_timeout = \"0s\" is out of range: allowed 1ms to 1day"
        ),
        "{e}"
    );
    let e = bad("retry_budget_min_per_second = -1");
    assert!(
        e.contains("retry_budget_min_per_second = -1 is out of range"),
        "{e}"
    );
    let e = bad("max_active_requests = 0");
    assert!(
        e.starts_with(
            "test.toml:9:23: error: max_active_requests = 0 is out of range: allowed 1 to 10000000"
        ),
        "{e}"
    );
    let e = bad("max_pending_requests = 5\nqueue_timeout = \"2s\"");
    assert!(
        e.starts_with(
            "test.toml:9:24: error: max_pending_requests applies only with max_active_requests"
        ),
        "{e}"
    );
    assert!(
        e.contains("test.toml:10:17: error: queue_timeout applies only with max_active_requests"),
        "{e}"
    );
    let e = bad("max_active_requests = 4\nqueue_timeout = \"0s\"");
    assert!(
        e.contains(
            "test.toml:10:17: error: queue_timeout = \"0s\" is out of range: allowed 1ms to 1h"
        ),
        "{e}"
    );
    let e = bad("max_active_requests = 4\nmax_pending_requests = -1");
    assert!(
        e.contains("test.toml:10:24: error: max_pending_requests = -1 is out of range: allowed 0 to 10000000"),
        "{e}"
    );
}

#[test]
fn the_admin_section_binds_and_reads_its_token_from_the_config_files_directory() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("fulcrum.toml").display().to_string();
    let token = "0123456789abcdef-admin";
    std::fs::write(dir.path().join("token"), format!("  {token}\n")).unwrap();
    std::fs::write(dir.path().join("short"), "0123456789\n").unwrap();
    std::fs::write(dir.path().join("empty"), "\n \n").unwrap();
    let with = |admin: &str| format!("{GOOD}\n[admin]\n{admin}\n");

    assert!(parse(&name, GOOD).unwrap().admin.is_none());
    let open = parse(&name, &with("bind = \"127.0.0.1:9901\"")).unwrap();
    let admin = open.admin.unwrap();
    assert_eq!(admin.bind, "127.0.0.1:9901".parse().unwrap());
    assert!(admin.token.is_none());

    let config = parse(
        &name,
        &with("bind = \"127.0.0.1:9901\"\ntoken_file = \"token\""),
    )
    .unwrap();
    let token_read = config.admin.unwrap().token.unwrap();
    assert!(token_read.matches(token.as_bytes()));
    assert!(!token_read.matches(b"0123456789abcdef-admiN"));
    assert!(!token_read.matches(b"0123456789abcdef-admin "));
    assert_eq!(format!("{token_read:?}"), "AdminToken(..)");

    let error = |admin: &str| parse(&name, &with(admin)).unwrap_err().to_string();
    let short = error("bind = \"127.0.0.1:9901\"\ntoken_file = \"short\"");
    assert!(
        short.contains(&format!(
            ":13:14: error: token_file `{}` holds 10 characters: a token needs at least 16",
            dir.path().join("short").display()
        )),
        "{short}"
    );
    let empty = error("bind = \"127.0.0.1:9901\"\ntoken_file = \"empty\"");
    assert!(empty.contains(":13:14: error: token_file `"), "{empty}");
    assert!(empty.contains("` is empty: a token needs"), "{empty}");
    let missing = error("bind = \"127.0.0.1:9901\"\ntoken_file = \"missing\"");
    assert!(missing.contains(":13:14: error: token_file `"), "{missing}");
    assert!(missing.contains("cannot be read"), "{missing}");
    let taken = error("bind = \"127.0.0.1:8080\"");
    assert!(
        taken.contains(":12:8: error: the admin listener binds 127.0.0.1:8080, which listener `web` already binds"),
        "{taken}"
    );
    let bad = error("bind = \"localhost:9901\"");
    assert!(
        bad.contains(":12:8: error: bind `localhost:9901` is not an IP address and port"),
        "{bad}"
    );
    let unknown = error("bind = \"127.0.0.1:9901\"\ntoken = \"x\"");
    assert!(
        unknown.contains(":13:1: error: unknown field `token`"),
        "{unknown}"
    );
}

const L4: &str = r#"
[listeners.db]
bind = "127.0.0.1:7000"
mode = "tcp"
upstream = "db"
proxy_protocol_from = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]

[listeners.tls]
bind = "127.0.0.1:7443"
mode = "tcp"
idle_timeout = "1h"

[[listeners.tls.routes]]
sni = ["a.example.com", "*.B.example.com"]
upstream = "a"

[[listeners.tls.routes]]
alpn = ["h2"]
upstream = "db"

[[listeners.tls.routes]]
upstream = "db"

[listeners.dns]
bind = "127.0.0.1:7000"
mode = "udp"
upstream = "dns"
max_flows = 50
responses = 1

[upstreams.db]
balance = "least_connections"
proxy_protocol = "v2"
servers = [{ address = "127.0.0.1:9001" }]

[upstreams.a]
servers = [{ address = "127.0.0.1:9002" }]

[upstreams.dns]
servers = [{ address = "127.0.0.1:9053" }]
[upstreams.dns.health_check]
type = "dns"
query = "health.example.com"
interval = "1s"
"#;

#[test]
fn l4_listeners_take_their_mode_routes_and_defaults() {
    let c = parse("test.toml", L4).unwrap();
    let by_name = |name: &str| c.listeners.iter().find(|l| l.name == name).unwrap();
    let db = by_name("db");
    let ListenerMode::Tcp(tcp) = &db.mode else {
        panic!("{:?}", db.mode)
    };
    assert!(!tcp.tls_passthrough);
    assert_eq!(tcp.idle_timeout, Duration::from_secs(600));
    assert_eq!(tcp.routes.len(), 1);
    assert!(tcp.routes[0].matches(None, &[]));
    assert!(
        !db.defer_accept,
        "server-speaks-first protocols need it off"
    );
    assert_eq!(db.proxy_protocol_from.len(), 3);
    assert_eq!(db.proxy_protocol_from[1].to_string(), "192.0.2.7/32");

    let ListenerMode::Tcp(tls) = &by_name("tls").mode else {
        panic!()
    };
    assert!(tls.tls_passthrough);
    assert_eq!(tls.idle_timeout, Duration::from_secs(3600));
    assert_eq!(tls.routes[0].sni, ["a.example.com", "*.b.example.com"]);
    assert!(tls.routes[0].matches(Some("a.example.com"), &[]));
    assert!(tls.routes[0].matches(Some("x.y.b.example.com"), &[]));
    assert!(!tls.routes[0].matches(Some("b.example.com"), &[]));
    assert!(!tls.routes[0].matches(None, &[]));
    assert!(tls.routes[1].matches(Some("other"), &[b"http/1.1".to_vec(), b"h2".to_vec()]));
    assert!(!tls.routes[1].matches(Some("other"), &[b"http/1.1".to_vec()]));

    // The same address as the tcp listener `db`: UDP ports are apart.
    let ListenerMode::Udp(udp) = &by_name("dns").mode else {
        panic!()
    };
    assert_eq!(udp.max_flows, 50);
    assert_eq!(udp.responses, Some(1));
    assert_eq!(udp.idle_timeout, Duration::from_secs(30));
    let dns = &c.upstreams[udp.upstream];
    assert_eq!(dns.name, "dns");
    let check = dns.health_check.as_ref().unwrap();
    assert_eq!(check.kind, CheckKind::Dns);
    assert_eq!(check.query, "health.example.com");
    let db_up = c.upstreams.iter().find(|u| u.name == "db").unwrap();
    assert_eq!(db_up.proxy_protocol, Some(ProxyProtocolVersion::V2));
}

#[test]
fn l4_mistakes_are_located_and_explained() {
    let e = error_text(
        r#"
[listeners.a]
bind = "127.0.0.1:7000"
mode = "tcpp"
upstream = "db"

[listeners.b]
bind = "127.0.0.1:7001"
mode = "tcp"
hsts = "max-age=1"
proxy_protocol_from = ["10.0.0.1/8", "nonsense"]
[[listeners.b.routes]]
host = "x.example.com"
upstream = "db"
[[listeners.b.routes]]
sni = ["bad name"]
upstream = "db"

[listeners.c]
bind = "127.0.0.1:7002"
mode = "udp"
max_connections = 5
[[listeners.c.routes]]
upstream = "db"

[listeners.d]
bind = "127.0.0.1:7003"
upstream = "db"
responses = 0
[[listeners.d.routes]]
sni = ["a.example.com"]
upstream = "web"

[upstreams.db]
proxy_protocol = "v3"
sticky_cookie = "s"
servers = [{ address = "127.0.0.1:9001" }]

[upstreams.web]
proxy_protocol = "v1"
servers = [{ address = "127.0.0.1:9002" }]
[upstreams.web.health_check]
type = "tcp"
query = "x"
"#,
    );
    for expected in [
        "test.toml:4:8: error: unknown listener mode `tcpp`: expected \"http\", \"tcp\" or \"udp\"",
        "test.toml:10:8: error: hsts applies to http listeners, not to mode = \"tcp\"",
        "test.toml:11:24: error: proxy_protocol_from `10.0.0.1/8` has host bits set: did you mean \"10.0.0.0/8\"?",
        "test.toml:11:38: error: proxy_protocol_from `nonsense` is not an address or network",
        "test.toml:13:8: error: host routes HTTP requests: a mode = \"tcp\" listener routes by sni and alpn",
        "test.toml:16:8: error: sni `bad name` is not a server name",
        "test.toml:22:19: error: max_connections does not apply to mode = \"udp\" listeners: a udp listener's limit is max_flows",
        "error: routes does not apply to mode = \"udp\" listeners",
        "error: listener `c` (mode = \"udp\") has no upstream",
        "test.toml:28:12: error: upstream applies to mode = \"tcp\" and \"udp\" listeners",
        "test.toml:29:13: error: responses applies to mode = \"udp\" listeners",
        "test.toml:31:7: error: sni routes a TLS connection passed through untouched",
        "test.toml:35:18: error: proxy_protocol `v3` is not a version: use \"v1\" or \"v2\"",
        "error: sticky_cookie needs HTTP: upstream `db` is used by tcp listener `b`",
        "error: proxy_protocol is sent on connections from tcp listeners only: upstream `web` is used by http listener `d`",
        "error: query applies only to type = \"dns\" checks",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn a_tcp_listener_needs_an_upstream_and_a_catch_all_goes_last() {
    let e = error_text(
        r#"
[listeners.a]
bind = "127.0.0.1:7000"
mode = "tcp"

[listeners.b]
bind = "127.0.0.1:7001"
mode = "tcp"
upstream = "db"
[[listeners.b.routes]]
upstream = "db"
[[listeners.b.routes]]
sni = ["x.example.com"]
upstream = "db"

[upstreams.db]
hash_key = "path"
balance = "consistent_hash"
tls = { insecure_skip_verify = true }
servers = [{ address = "127.0.0.1:9001" }]
"#,
    );
    for expected in [
        "error: listener `a` (mode = \"tcp\") has no upstream",
        "test.toml:12:1: error: listener `b` has a route after one with neither sni nor alpn",
        "test.toml:9:12: error: listener `b` has a route that takes every connection already",
        "error: upstream `db` is used by tcp listener `b`, which has no paths, headers or cookies",
        "error: upstream `db` is used by tcp listener `b`, which relays bytes as they are",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn a_udp_upstream_is_not_checked_over_http_by_default() {
    let text = L4.replace("type = \"dns\"\n", "");
    let e = error_text(&text);
    assert!(e.contains("error: upstream `dns` serves udp listener `dns`: its servers answer datagrams, not HTTP (the default check type): set type = \"dns\""), "{e}");
    let text = L4
        .replace("type = \"dns\"\n", "type = \"tcp\"\n")
        .replace("query = \"health.example.com\"\n", "");
    parse("test.toml", &text).unwrap();
}

#[test]
fn a_udp_listener_s_responses_is_bounded() {
    let e = error_text(
        r#"
[listeners.dns]
bind = "127.0.0.1:7000"
mode = "udp"
upstream = "dns"
responses = 1001

[listeners.tcp]
bind = "127.0.0.1:7001"
mode = "tcp"
upstream = "dns"
responses = 1

[upstreams.dns]
servers = [{ address = "127.0.0.1:9053" }]
"#,
    );
    for expected in [
        "test.toml:6:13: error: responses = 1001 is out of range: allowed 1 to 1000",
        "test.toml:12:13: error: responses applies to mode = \"udp\" listeners",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
    let unset = parse("test.toml", &L4.replace("responses = 1\n", "")).unwrap();
    let Some(ListenerMode::Udp(udp)) = unset
        .listeners
        .iter()
        .map(|l| &l.mode)
        .find(|m| matches!(m, ListenerMode::Udp(_)))
    else {
        panic!()
    };
    assert_eq!(udp.responses, None);
}
