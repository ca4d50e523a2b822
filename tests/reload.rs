//! `kill -HUP`: the running binary reads its config file again and applies it, or keeps
//! serving with the one it has and says why not.

mod support;

use std::collections::HashSet;

use support::{Backend, Process, get_text};

fn config(servers: &str, bind: &str) -> String {
    format!(
        "[listeners.web]\nbind = \"{bind}\"\n[[listeners.web.routes]]\nupstream = \"app\"\n\
         [upstreams.app]\nservers = [{servers}]\n[access_log]\nenabled = false\n"
    )
}

async fn answers(process: &Process, n: usize) -> HashSet<String> {
    let client = support::client();
    let mut seen = HashSet::new();
    for _ in 0..n {
        seen.insert(get_text(&client, &process.url("/")).await);
    }
    seen
}

#[tokio::test]
async fn sighup_applies_a_good_config_and_keeps_serving_through_a_bad_one() {
    let (a, b) = (Backend::named("a").await, Backend::named("b").await);
    let process = Process::start(&config("{ address = \"{0}\" }", "127.0.0.1:0"), &[&a]);
    assert_eq!(answers(&process, 4).await, HashSet::from(["a".to_string()]));

    // A server added: after the reload both take requests, on the same listener.
    let both = config(
        "{ address = \"{0}\" }, { address = \"{1}\" }",
        "127.0.0.1:0",
    );
    std::fs::write(&process.config, support::fill(&both, &[&a, &b])).unwrap();
    process.signal("HUP");
    process.log_from("config reloaded").await;
    assert_eq!(
        answers(&process, 6).await,
        HashSet::from(["a".to_string(), "b".to_string()])
    );

    // A broken file: the error says where, and the last good config goes on serving.
    std::fs::write(
        &process.config,
        "[upstreams.app]\nservers = [{ address = \"nowhere\" }]\n",
    )
    .unwrap();
    process.signal("HUP");
    let log = process.log_from("config not reloaded").await;
    assert!(log.contains("fulcrum.toml:2:"), "{log}");
    assert_eq!(answers(&process, 6).await.len(), 2);

    // A listener moved: only a restart can bind it, so the reload is refused as a whole.
    let moved = config("{ address = \"{0}\" }", "127.0.0.1:1");
    std::fs::write(&process.config, support::fill(&moved, &[&a])).unwrap();
    process.signal("HUP");
    let log = process.log_from("listener `web` bind changed from").await;
    assert!(log.contains("restart Fulcrum to apply"), "{log}");
    assert_eq!(answers(&process, 6).await.len(), 2);
}

/// One server behind a sticky cookie, with `top` at the top of the file.
fn sticky(top: &str) -> String {
    let config = config("{ address = \"{0}\" }", "127.0.0.1:0");
    format!(
        "{top}{}",
        config.replace("servers = ", "sticky_cookie = \"s\"\nservers = ")
    )
}

/// The `s=TOKEN` that pins a new client to the (only) server.
async fn pin(process: &Process) -> String {
    let resp = support::client()
        .get(process.url("/"))
        .send()
        .await
        .unwrap();
    let value = resp.headers()["set-cookie"].to_str().unwrap();
    value.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn sticky_tokens_survive_a_reload_and_with_a_configured_secret_a_restart() {
    let app = Backend::named("app").await;
    let secret = "sticky_secret = \"0123456789abcdef0123456789abcdef\"\n";

    // Without a secret each process draws its own key: a restart moves pinned clients.
    let first = Process::start(&sticky(""), &[&app]);
    let second = Process::start(&sticky(""), &[&app]);
    let token = pin(&first).await;
    assert_ne!(pin(&second).await, token);
    // A reload keeps the process's key.
    first.signal("HUP");
    first.log_from("config reloaded").await;
    assert_eq!(pin(&first).await, token);

    // A secret configured (here by a reload): the same token in any process given it.
    std::fs::write(&second.config, support::fill(&sticky(secret), &[&app])).unwrap();
    second.signal("HUP");
    second.log_from("config reloaded").await;
    let keyed = pin(&second).await;
    assert_ne!(keyed, token);
    let third = Process::start(&sticky(secret), &[&app]);
    assert_eq!(pin(&third).await, keyed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_steady_load_on_several_workers_fail_no_request() {
    let backends = [
        Backend::named("a").await,
        Backend::named("b").await,
        Backend::named("c").await,
    ];
    let refs: Vec<&Backend> = backends.iter().collect();
    let with = |servers: &str| format!("workers = 2\n{}", config(servers, "127.0.0.1:0"));
    let process = Process::start(&with("{ address = \"{0}\" }, { address = \"{1}\" }"), &refs);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Six clients, HTTP/1.1 and HTTP/2, each at most 2,000 requests or until told to stop.
    let clients = (0..6).map(|i| {
        let client = if i % 2 == 0 {
            support::client()
        } else {
            reqwest::Client::builder()
                .no_proxy()
                .http2_prior_knowledge()
                .build()
                .unwrap()
        };
        let (url, stop) = (process.url("/"), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..2_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let resp = client.get(&url).send().await;
                answers.push(match resp {
                    Ok(resp) if resp.status() == 200 => resp.text().await.unwrap_or_default(),
                    Ok(resp) => format!("status {}", resp.status()),
                    Err(e) => format!("error {e}"),
                });
            }
            answers
        })
    });
    let clients: Vec<_> = clients.collect();
    let sets = [
        "{ address = \"{1}\" }, { address = \"{2}\" }",
        "{ address = \"{0}\", weight = 3 }, { address = \"{2}\" }",
        "{ address = \"{0}\" }, { address = \"{1}\", drain = true }, { address = \"{2}\" }",
        "{ address = \"{2}\" }",
        "{ address = \"{0}\" }, { address = \"{1}\" }, { address = \"{2}\" }",
        "{ address = \"{1}\" }",
    ];
    for servers in sets {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        std::fs::write(&process.config, support::fill(&with(servers), &refs)).unwrap();
        process.signal("HUP");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for client in clients {
        for answer in client.await.unwrap() {
            total += 1;
            assert!(
                ["a", "b", "c"].contains(&answer.as_str()),
                "a request failed: {answer}"
            );
        }
    }
    assert!(total > 100, "only {total} requests ran");
    let log = process.stderr.lock().unwrap().clone();
    assert_eq!(log.matches("config reloaded").count(), 6, "{log}");
    // The last config is the one in force.
    assert_eq!(answers(&process, 6).await, HashSet::from(["b".to_string()]));
}
