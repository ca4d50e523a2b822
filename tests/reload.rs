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
