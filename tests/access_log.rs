//! The access log as an operator reads it: one line per request on stdout, as text or JSON,
//! or none when switched off.

mod support;

use std::time::Duration;

use support::{Backend, Process, client, simple_config};

#[tokio::test]
async fn text_lines_name_the_request_and_the_server() {
    let backend = Backend::named("a").await;
    let fulcrum = Process::start(&simple_config(1, ""), &[&backend]);
    client()
        .get(fulcrum.url("/logged?x=1"))
        .send()
        .await
        .unwrap();
    let line = fulcrum.stdout_line("path=/logged").await;
    for field in [
        "client=127.0.0.1",
        "method=GET",
        "status=200",
        &format!("upstream={}", backend.addr),
        "bytes=1",
    ] {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

#[tokio::test]
async fn json_lines_parse_and_carry_the_fields() {
    let backend = Backend::named("a").await;
    let fulcrum = Process::start(
        &simple_config(1, "[access_log]\nformat = \"json\"\n"),
        &[&backend],
    );
    client()
        .post(fulcrum.url("/json"))
        .body("hello")
        .send()
        .await
        .unwrap();
    let line = fulcrum.stdout_line("/json").await;
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(value["method"], "POST");
    assert_eq!(value["status"], 200);
    assert_eq!(value["upstream"], backend.addr.to_string());
    assert!(
        value["duration_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
    assert!(
        value["upstream_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{line}"
    );
}

#[tokio::test]
async fn switched_off_means_no_lines() {
    let backend = Backend::named("a").await;
    let fulcrum = Process::start(
        &simple_config(1, "[access_log]\nenabled = false\n"),
        &[&backend],
    );
    for _ in 0..3 {
        client().get(fulcrum.url("/quiet")).send().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = fulcrum.stdout.lock().unwrap().clone();
    assert!(
        !out.contains("/quiet"),
        "access log lines despite enabled = false: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_nobody_reads_never_stops_a_worker() {
    let backend = Backend::named("a").await;
    // Stdout into a pipe the test never reads: it fills after about 64 KiB of lines.
    let (reader, writer) = std::io::pipe().unwrap();
    let fulcrum = Process::start_with(&simple_config(1, ""), &[&backend], move |command| {
        command.stdout(writer);
    });
    let http = client();
    let started = std::time::Instant::now();
    // Far more lines than the pipe and the queue hold, over concurrent clients.
    let loops = (0..8).map(|_| {
        let (http, url) = (
            http.clone(),
            fulcrum.url("/a-path-that-makes-the-line-longer"),
        );
        async move {
            for _ in 0..3_000 {
                let resp = http.get(&url).send().await.unwrap();
                assert_eq!(resp.status(), 200);
            }
        }
    });
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(loops),
    )
    .await
    .expect("requests stalled behind a full stdout");
    eprintln!(
        "24,000 requests with stdout full took {:?}",
        started.elapsed()
    );
    let warning = tokio::time::timeout(
        Duration::from_secs(15),
        fulcrum.log_from("access log lines dropped"),
    )
    .await
    .expect("no warning about dropped lines");
    assert!(warning.contains("dropped="), "{warning}");
    drop(reader);
}
