//! Checking an upstream's health settings: its active checks (`[upstreams.NAME.health_check]`),
//! passive outlier detection (`[upstreams.NAME.outlier_detection]`) and `panic_threshold`.

use std::time::Duration;

use toml::Spanned;

use super::{Checker, DAY, HOUR, MS, file};
use crate::config::model::{CheckKind, HealthCheck, OutlierDetection};

/// Passing checks in a row that bring a server back, and failing ones that take it down,
/// unless the config says otherwise (HAProxy's defaults).
const RISE: i64 = 2;
const FALL: i64 = 3;

/// Envoy's default: below half the servers healthy, balance over all of them.
pub(super) const PANIC_THRESHOLD: i64 = 50;

impl Checker {
    pub(super) fn health_check(
        &mut self,
        check: Spanned<file::HealthCheck>,
    ) -> Option<HealthCheck> {
        let span = check.span();
        let check = check.into_inner();
        let kind = match check
            .kind
            .as_ref()
            .map(|k| (k.get_ref().as_str(), k.span()))
        {
            None | Some(("http", _)) => CheckKind::Http,
            Some(("tcp", _)) => CheckKind::Tcp,
            Some(("dns", _)) => CheckKind::Dns,
            Some((other, span)) => {
                self.error(
                    span,
                    format!(
                        "unknown health check type `{other}`: expected \"http\", \"tcp\" or \"dns\""
                    ),
                );
                CheckKind::Http
            }
        };
        let interval = self.duration(
            check.interval.as_ref(),
            "interval",
            10 * MS..=HOUR,
            Duration::from_secs(5),
        );
        let timeout = self.duration(
            check.timeout.as_ref(),
            "timeout",
            MS..=HOUR,
            Duration::from_secs(2).min(interval / 2),
        );
        if timeout >= interval {
            let at = check.timeout.as_ref().or(check.interval.as_ref());
            self.error(
                at.map_or(span.clone(), Spanned::span),
                format!(
                    "health check timeout ({}) must be shorter than its interval ({}): a check would still run when the next one starts",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            );
        }
        let jitter = self.duration(
            check.jitter.as_ref(),
            "jitter",
            Duration::ZERO..=HOUR,
            interval / 10,
        );
        if jitter >= interval
            && let Some(j) = &check.jitter
        {
            self.error(
                j.span(),
                "health check jitter must be shorter than its interval",
            );
        }
        let rise = self.int(check.rise.as_ref(), "rise", 1, 1000, RISE) as u32;
        let fall = self.int(check.fall.as_ref(), "fall", 1, 1000, FALL) as u32;
        let http_only = [
            ("method", check.method.as_ref().map(Spanned::span)),
            ("path", check.path.as_ref().map(Spanned::span)),
            ("host", check.host.as_ref().map(Spanned::span)),
            (
                "expect_status",
                check.expect_status.as_ref().map(Spanned::span),
            ),
            ("expect_body", check.expect_body.as_ref().map(Spanned::span)),
        ];
        if kind != CheckKind::Http {
            for (key, at) in http_only {
                if let Some(at) = at {
                    self.error(at, format!("{key} applies only to type = \"http\" checks"));
                }
            }
        }
        let method = match &check.method {
            None => http::Method::GET,
            Some(m) => {
                match http::Method::from_bytes(m.get_ref().as_bytes()) {
                    Ok(method) if m.get_ref().bytes().all(|b| b.is_ascii_uppercase()) => method,
                    _ => {
                        self.error(
                        m.span(),
                        format!("method `{}` is not an HTTP method: write it like \"GET\" or \"HEAD\"", m.get_ref()),
                    );
                        http::Method::GET
                    }
                }
            }
        };
        let path = match &check.path {
            None => "/".to_string(),
            Some(p) if is_request_target(p.get_ref()) => p.get_ref().clone(),
            Some(p) => {
                self.error(
                    p.span(),
                    format!(
                        "path `{}` must start with `/` and hold no spaces or control characters",
                        p.get_ref()
                    ),
                );
                "/".to_string()
            }
        };
        let host = check.host.as_ref().and_then(|h| {
            let ok = http::HeaderValue::from_str(h.get_ref()).is_ok()
                && !h.get_ref().is_empty()
                && !h.get_ref().bytes().any(|b| b.is_ascii_whitespace());
            if !ok {
                self.error(
                    h.span(),
                    format!("host `{}` is not a Host header value", h.get_ref()),
                );
            }
            ok.then(|| h.get_ref().clone())
        });
        let expect_status = match &check.expect_status {
            None => vec![(200, 399)],
            Some(list) if list.get_ref().is_empty() => {
                self.error(list.span(), "expect_status is empty: list codes or ranges like [200, \"300-399\"]");
                vec![(200, 399)]
            }
            Some(list) => list
                .get_ref()
                .iter()
                .filter_map(|item| {
                    let parsed = match item.get_ref() {
                        file::StatusItem::Code(code) => u16::try_from(*code)
                            .ok()
                            .and_then(|c| status_range(&c.to_string())),
                        file::StatusItem::Text(text) => status_range(text),
                    };
                    if parsed.is_none() {
                        let shown = match item.get_ref() {
                            file::StatusItem::Code(code) => code.to_string(),
                            file::StatusItem::Text(text) => format!("\"{text}\""),
                        };
                        self.error(item.span(), format!("expect_status entry {shown} is not a status code or range: write 200 or \"200-399\" (codes 100 to 599, low before high)"));
                    }
                    parsed
                })
                .collect(),
        };
        let expect_body = check.expect_body.as_ref().and_then(|b| {
            if b.get_ref().is_empty() || b.get_ref().len() > crate::health::BODY_LIMIT {
                self.error(
                    b.span(),
                    format!(
                        "expect_body must hold 1 to {} bytes",
                        crate::health::BODY_LIMIT
                    ),
                );
                return None;
            }
            Some(b.get_ref().clone())
        });
        let query = match (&check.query, kind) {
            (Some(q), CheckKind::Dns) => {
                let text = q.get_ref();
                let bare = text.strip_suffix('.').unwrap_or(text);
                let valid = text == "."
                    || (!bare.is_empty()
                        && bare.len() <= 253
                        && bare.split('.').all(|l| !l.is_empty() && l.len() <= 63)
                        && bare.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'
                        }));
                if !valid {
                    self.error(q.span(), format!("query `{text}` is not a DNS name: write it like \"health.example.com\" or \".\""));
                }
                text.clone()
            }
            (Some(q), _) => {
                self.error(q.span(), "query applies only to type = \"dns\" checks");
                String::new()
            }
            (None, CheckKind::Dns) => ".".to_string(),
            (None, _) => String::new(),
        };
        Some(HealthCheck {
            kind,
            interval,
            timeout,
            jitter,
            rise,
            fall,
            method,
            path,
            host,
            expect_status,
            expect_body,
            query,
        })
    }

    pub(super) fn outlier_detection(
        &mut self,
        outlier: Option<Spanned<file::OutlierDetection>>,
    ) -> OutlierDetection {
        let defaults = OutlierDetection::default();
        let Some(outlier) = outlier else {
            return defaults;
        };
        let o = outlier.into_inner();
        let base_ejection_time = self.duration(
            o.base_ejection_time.as_ref(),
            "base_ejection_time",
            MS..=DAY,
            defaults.base_ejection_time,
        );
        let max_ejection_time = self.duration(
            o.max_ejection_time.as_ref(),
            "max_ejection_time",
            MS..=DAY,
            defaults.max_ejection_time.max(base_ejection_time),
        );
        if max_ejection_time < base_ejection_time
            && let Some(max) = &o.max_ejection_time
        {
            self.error(
                max.span(),
                "max_ejection_time must be at least base_ejection_time",
            );
        }
        OutlierDetection {
            enabled: o.enabled.unwrap_or(true),
            consecutive_5xx: self.int(
                o.consecutive_5xx.as_ref(),
                "consecutive_5xx",
                0,
                1_000_000,
                i64::from(defaults.consecutive_5xx),
            ) as u32,
            consecutive_failures: self.int(
                o.consecutive_failures.as_ref(),
                "consecutive_failures",
                0,
                1_000_000,
                i64::from(defaults.consecutive_failures),
            ) as u32,
            base_ejection_time,
            max_ejection_time,
            max_ejection_percent: self.int(
                o.max_ejection_percent.as_ref(),
                "max_ejection_percent",
                1,
                100,
                i64::from(defaults.max_ejection_percent),
            ) as u32,
        }
    }
}

/// A status code (`"503"`) or inclusive range (`"200-399"`) within 100–599, low before high.
pub fn status_range(text: &str) -> Option<(u16, u16)> {
    let code = |t: &str| {
        let t = t.trim();
        (t.len() == 3 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| t.parse::<u16>().ok())
            .flatten()
            .filter(|c| (100..=599).contains(c))
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (code(low)?, code(high)?),
        None => (code(text)?, code(text)?),
    };
    (low <= high).then_some((low, high))
}

/// Whether `path` can be sent as an origin-form request target.
fn is_request_target(path: &str) -> bool {
    path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::status_range;

    #[test]
    fn status_ranges_parse_codes_and_ranges_and_refuse_the_rest() {
        assert_eq!(status_range("200"), Some((200, 200)));
        assert_eq!(status_range("200-399"), Some((200, 399)));
        assert_eq!(status_range(" 204 - 204 "), Some((204, 204)));
        for bad in [
            "",
            "2xx",
            "399-200",
            "99",
            "600",
            "200-",
            "-200",
            "1000",
            "200-399-500",
            "+20",
        ] {
            assert_eq!(status_range(bad), None, "{bad}");
        }
    }
}
