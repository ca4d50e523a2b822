//! The `fulcrum` command as a user runs it: `check` on good and broken configs, every
//! example config, and `run` refusing to start half-working.

mod support;

use support::{TempDir, binary};

/// Every example config passes `fulcrum check`. An example whose comments give the
/// `fulcrum` commands that make its files (certificates) is checked in a directory of its
/// own after running those commands, as a reader would.
#[test]
fn every_example_config_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let setup: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#   fulcrum "))
            .collect();
        let dir = TempDir::new();
        let path = if setup.is_empty() {
            path
        } else {
            let copy = dir.0.join(path.file_name().unwrap());
            std::fs::write(&copy, &text).unwrap();
            for command in setup {
                let args: Vec<String> = command
                    .split_whitespace()
                    .map(|a| a.trim_matches('\'').to_string())
                    .collect();
                let out = binary().args(&args).current_dir(&dir.0).output().unwrap();
                assert!(
                    out.status.success(),
                    "fulcrum {command}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            copy
        };
        let out = binary().arg("check").arg("-c").arg(&path).output().unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
        checked += 1;
    }
    assert!(checked >= 3);
}

#[test]
fn check_reports_every_problem_with_file_line_and_column() {
    let dir = TempDir::new();
    let path = dir.0.join("broken.toml");
    std::fs::write(
        &path,
        "[listeners.web]\nbind = \"127.0.0.1:80\"\n[[listeners.web.routes]]\nupstream = \"missing\"\n\n[upstreams.app]\nservers = [{ address = \"127.0.0.1:9001\", weight = 0 }]\n",
    )
    .unwrap();
    let out = binary().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display();
    assert!(stderr.contains(&format!("{file}:4:12: error: route sends to upstream `missing`, which is not defined (defined: `app`)")), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{file}:7:51: error: weight = 0 is out of range: allowed 1 to 1000"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("    4 | upstream = \"missing\""),
        "{stderr}"
    );
}

#[test]
fn run_refuses_a_broken_config_without_listening() {
    let dir = TempDir::new();
    let path = dir.0.join("broken.toml");
    std::fs::write(
        &path,
        "[listeners.web]\nbind = \"127.0.0.1:0\"\nroutes = []\nextra = 1\n",
    )
    .unwrap();
    let out = binary().arg("run").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown field `extra`"), "{stderr}");
}

#[test]
fn run_exits_with_a_clear_error_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = TempDir::new();
    let path = dir.0.join("fulcrum.toml");
    let config = format!(
        "[listeners.web]\nbind = \"{addr}\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [{{ address = \"127.0.0.1:9\" }}]\n"
    );
    std::fs::write(&path, config).unwrap();
    let out = binary().arg("run").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("listener `web` cannot bind {addr}")),
        "{stderr}"
    );
}

#[test]
fn a_second_fulcrum_cannot_share_a_running_ones_port() {
    // Each worker's socket is bound with SO_REUSEPORT, which another process of the same
    // user could join silently, taking a share of the connections.
    let config = "workers = 2\n[listeners.web]\nbind = \"127.0.0.1:0\"\n[[listeners.web.routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [{ address = \"127.0.0.1:9\" }]\n";
    let first = support::Process::start(config, &[]);
    let addr = first.addr;
    let dir = TempDir::new();
    let path = dir.0.join("fulcrum.toml");
    std::fs::write(&path, config.replace("127.0.0.1:0", &addr.to_string())).unwrap();
    let mut second = binary()
        .arg("run")
        .arg("-c")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "a second Fulcrum started on {addr}"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(
        stderr.contains(&format!("listener `web` cannot bind {addr}")),
        "{stderr}"
    );
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = binary()
        .args(["check", "-c", "/nonexistent/fulcrum.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("/nonexistent/fulcrum.toml: error: cannot read config file")
    );
}

#[tokio::test]
async fn the_demo_balances_across_its_three_backends_over_http_and_https() {
    let listen = format!("127.0.0.1:{}", support::unused_addr().port());
    let https_port = support::unused_addr().port();
    let certs = TempDir::new();
    let mut demo = binary()
        .args(["demo", "--listen", &listen])
        .args(["--listen-https", &format!("127.0.0.1:{https_port}")])
        .arg("--certs")
        .arg(&certs.0)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = support::client();
    let url = format!("http://{listen}/");
    let mut answers = Vec::new();
    for _ in 0..100 {
        match client.get(&url).send().await {
            Ok(resp) => answers.push(resp.text().await.unwrap()),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
        if answers.len() == 3 {
            break;
        }
    }
    // The line the demo prints for HTTPS works as printed (but for the port).
    let mut stdout = std::io::BufReader::new(demo.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("--cacert") {
        use std::io::BufRead;
        if stdout.read_line(&mut printed).unwrap() == 0 {
            break;
        }
    }
    let ca = printed
        .split("--cacert ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no curl line in {printed:?}"))
        .to_string();
    let https = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            &ca,
            &format!("https://localhost:{https_port}/"),
        ])
        .output()
        .unwrap();
    let _ = demo.kill();
    let _ = demo.wait();
    assert_eq!(answers.len(), 3, "the demo did not answer");
    for (answer, name) in answers.iter().zip(["alpha", "beta", "gamma"]) {
        assert!(
            answer.starts_with(&format!("Hello from demo backend {name}")),
            "{answers:?}"
        );
    }
    let body = String::from_utf8_lossy(&https.stdout);
    assert!(
        body.starts_with("Hello from demo backend"),
        "{body} {}",
        String::from_utf8_lossy(&https.stderr)
    );
    assert!(std::path::Path::new(&ca).starts_with(&certs.0), "{ca}");
}
