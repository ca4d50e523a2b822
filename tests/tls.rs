//! HTTPS through real handshakes: rustls and curl/openssl clients against a TLS listener
//! (SNI, ALPN, versions, resumption, client certificates, certificates swapped on disk,
//! handshake deadline), and Fulcrum speaking TLS to real HTTPS servers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::tls::{self, Issued, Key, Pki, TlsBackend};
use support::{Backend, Process, Proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS listener with `certificates` (in order) and `tls` lines, routing to backend 0.
fn https_config(certificates: &[&Issued], tls: &str, listener: &str) -> String {
    let list: Vec<String> = certificates
        .iter()
        .map(|c| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.cert.display(),
                c.key.display()
            )
        })
        .collect();
    format!(
        "[listeners.https]\nbind = \"127.0.0.1:0\"\n{listener}\n[[listeners.https.routes]]\nupstream = \"app\"\n\n\
         [listeners.https.tls]\ncertificates = [{}]\n{tls}\n\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n",
        list.join(", ")
    )
}

fn client(pki: &Pki, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    Arc::new(tls::client_config(pki, alpn))
}

#[tokio::test]
async fn http1_and_http2_share_a_tls_listener_chosen_by_alpn() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(&https_config(&[&site], "", ""), &[&backend]).await;

    let mut h1 = tls::connect(proxy.addr, "app.test", client(&pki, &["http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(tls::get(&mut h1, "app.test", "/x").await, (200, "a".into()));
    let seen = backend.seen.last();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert!(
        seen.headers["forwarded"]
            .to_str()
            .unwrap()
            .ends_with("proto=https"),
        "{:?}",
        seen.headers["forwarded"]
    );

    let h2 = tls::connect(proxy.addr, "app.test", client(&pki, &["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) = h2::client::handshake(h2).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let request = http::Request::get("https://app.test/y").body(()).unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let mut text = Vec::new();
        while let Some(chunk) = body.data().await {
            text.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(text, b"a");
        send = send.ready().await.unwrap();
    }
    assert_eq!(backend.seen.count(), 4);
}

#[tokio::test]
async fn sni_chooses_among_certificates_and_the_first_is_the_default() {
    let pki = Pki::new();
    let first = pki.server("first", &["first.test"], Key::Ecdsa);
    let wildcard = pki.server("wild", &["*.wild.test"], Key::Ecdsa);
    let exact = pki.server("exact", &["exact.wild.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(
        &https_config(&[&first, &wildcard, &exact], "", ""),
        &[&backend],
    )
    .await;
    let config = client(&pki, &["http/1.1"]);
    for (sni, cn) in [
        ("first.test", "first.test"),
        ("a.wild.test", "*.wild.test"),
        ("exact.wild.test", "exact.wild.test"),
    ] {
        let mut stream = tls::connect(proxy.addr, sni, config.clone()).await.unwrap();
        assert_eq!(tls::peer_cn(&stream), cn, "SNI {sni}");
        assert_eq!(tls::get(&mut stream, sni, "/").await.0, 200);
    }
    // A name no certificate has gets the first certificate, which the client then refuses.
    let refused = tls::connect(proxy.addr, "other.test", config.clone()).await;
    let error = refused.expect_err("a certificate for another name was accepted");
    assert!(error.to_string().contains("not valid for name"), "{error}");
    // Two labels deep is not covered by a wildcard either.
    assert!(
        tls::connect(proxy.addr, "a.b.wild.test", config)
            .await
            .is_err()
    );
}

/// `openssl s_client` with `args` against `addr`; its whole output.
fn s_client(addr: std::net::SocketAddr, args: &[&str]) -> String {
    let output = std::process::Command::new("openssl")
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl is installed (.ci/run installs it)");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn an_rsa_and_an_ecdsa_chain_for_one_name_are_served_by_what_the_client_supports() {
    let pki = Pki::new();
    let ecdsa = pki.server("ecdsa", &["app.test"], Key::Ecdsa);
    let rsa = pki.server("rsa", &["app.test"], Key::Rsa);
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(&https_config(&[&rsa, &ecdsa], "", ""), &[&backend]).await;
    let addr = proxy.addr;
    let ca = pki.ca_pem.display().to_string();
    let ecdsa_out = tokio::task::spawn_blocking(move || {
        s_client(addr, &["-servername", "app.test", "-CAfile", &ca])
    })
    .await
    .unwrap();
    assert!(
        ecdsa_out.contains("Peer signature type: ECDSA"),
        "{ecdsa_out}"
    );
    let ca = pki.ca_pem.display().to_string();
    let rsa_out = tokio::task::spawn_blocking(move || {
        s_client(
            addr,
            &[
                "-servername",
                "app.test",
                "-CAfile",
                &ca,
                "-sigalgs",
                "RSA-PSS+SHA256:RSA+SHA256",
            ],
        )
    })
    .await
    .unwrap();
    assert!(rsa_out.contains("Peer signature type: RSA"), "{rsa_out}");
    assert!(rsa_out.contains("Verify return code: 0 (ok)"), "{rsa_out}");
}

#[tokio::test]
async fn tls_1_2_can_be_switched_off() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let both = Proxy::start(&https_config(&[&site], "", ""), &[&backend]).await;
    let only13 = Proxy::start(
        &https_config(&[&site], "min_version = \"1.3\"", ""),
        &[&backend],
    )
    .await;
    let tls12 = |pki: &Pki| {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    };
    let mut stream = tls::connect(both.addr, "app.test", tls12(&pki))
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert_eq!(tls::get(&mut stream, "app.test", "/").await.0, 200);
    let refused = tls::connect(only13.addr, "app.test", tls12(&pki)).await;
    let error = refused.expect_err("TLS 1.2 was accepted with min_version = 1.3");
    assert!(error.to_string().contains("ProtocolVersion"), "{error}");
    let mut stream = tls::connect(only13.addr, "app.test", client(&pki, &[]))
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(tls::get(&mut stream, "app.test", "/").await.0, 200);
}

#[tokio::test]
async fn returning_clients_resume_their_session() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    // Two workers: a ticket made by one must be accepted by the other.
    let proxy = Proxy::start_workers(&https_config(&[&site], "", ""), &[&backend], 2);
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der()).unwrap();
        let config = Arc::new(
            rustls::ClientConfig::builder_with_protocol_versions(versions)
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let mut kinds = Vec::new();
        for _ in 0..4 {
            let mut stream = tls::connect(proxy.addr, "app.test", config.clone())
                .await
                .unwrap();
            // TLS 1.3 tickets arrive after the handshake: read the response first.
            assert_eq!(tls::get(&mut stream, "app.test", "/").await.0, 200);
            kinds.push(stream.get_ref().1.handshake_kind().unwrap());
        }
        assert_eq!(kinds[0], rustls::HandshakeKind::Full);
        assert!(
            kinds[1..]
                .iter()
                .all(|k| *k == rustls::HandshakeKind::Resumed),
            "{versions:?}: {kinds:?}"
        );
    }
}

#[tokio::test]
async fn client_certificates_required_optional_and_refused() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let alice = pki.client("alice", "alice.example");
    let stranger_ca = Pki::named("Stranger CA");
    let mallory = stranger_ca.client("mallory", "mallory.example");
    let backend = Backend::named("a").await;
    let ca = pki.ca_pem.display().to_string();
    let required = Proxy::start(
        &https_config(
            &[&site],
            &format!("client_auth = \"required\"\nclient_ca = \"{ca}\""),
            "",
        ),
        &[&backend],
    )
    .await;
    let optional = Proxy::start(
        &https_config(
            &[&site],
            &format!("client_auth = \"optional\"\nclient_ca = \"{ca}\""),
            "",
        ),
        &[&backend],
    )
    .await;
    let with_cert = |who: &Issued| tls::client_with_cert(&pki, who);
    // A request that claims a certificate in the header itself.
    let forged = |host: &str| {
        format!(
            "GET / HTTP/1.1\r\nhost: {host}\r\nx-forwarded-client-cert: Subject=\"CN=admin\"\r\nconnection: close\r\n\r\n"
        )
    };

    // Required, with a certificate from the CA: the server learns who the client is, and
    // the client's own header is gone.
    let mut stream = tls::connect(required.addr, "app.test", with_cert(&alice))
        .await
        .unwrap();
    assert!(
        tls::exchange(&mut stream, &forged("app.test"))
            .await
            .starts_with("HTTP/1.1 200")
    );
    let seen = backend.seen.last();
    let described: Vec<_> = seen
        .headers
        .get_all("x-forwarded-client-cert")
        .iter()
        .collect();
    assert_eq!(described.len(), 1, "{described:?}");
    let described = described[0].to_str().unwrap();
    assert!(described.starts_with("Hash="), "{described}");
    assert!(
        described.contains("Subject=\"CN=alice.example\""),
        "{described}"
    );
    assert!(described.contains("DNS=alice.example"), "{described}");
    assert!(!described.contains("admin"), "{described}");

    // Required, without one, or with one from another CA: no request gets through.
    let count = backend.seen.count();
    for config in [client(&pki, &[]), with_cert(&mallory)] {
        // TLS 1.3 clients finish their side first; the refusal comes as an alert on read.
        if let Ok(mut stream) = tls::connect(required.addr, "app.test", config).await {
            let answer = tls::exchange(&mut stream, &forged("app.test")).await;
            assert!(answer.is_empty(), "{answer}");
        }
    }
    assert_eq!(backend.seen.count(), count);

    // Optional, without one: served, and the forged header still does not pass.
    let mut stream = tls::connect(optional.addr, "app.test", client(&pki, &[]))
        .await
        .unwrap();
    assert!(
        tls::exchange(&mut stream, &forged("app.test"))
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert!(
        !backend
            .seen
            .last()
            .headers
            .contains_key("x-forwarded-client-cert")
    );
    // Optional, with a stranger's certificate: refused, not served as anonymous.
    if let Ok(mut stream) = tls::connect(optional.addr, "app.test", with_cert(&mallory)).await {
        assert!(
            tls::exchange(&mut stream, &forged("app.test"))
                .await
                .is_empty()
        );
    }
}

#[tokio::test]
async fn a_client_stuck_in_its_handshake_is_ended_by_the_deadline() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    // Without TCP_DEFER_ACCEPT, which would keep a silent client in the kernel, unseen.
    let proxy = Proxy::start(
        &format!(
            "{}\n[timeouts]\ntls_handshake = \"300ms\"\n",
            https_config(&[&site], "", "defer_accept = false")
        ),
        &[&backend],
    )
    .await;
    // Silent after connecting, and a ClientHello that never ends: both are closed.
    for first in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        tcp.write_all(first).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "still open: {read:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Plain HTTP sent to the TLS port: refused, not mistaken for a request.
    let answer = support::raw(proxy.addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(!answer.contains("200"), "{answer}");
    assert_eq!(backend.seen.count(), 0);
}

#[tokio::test]
async fn curl_speaks_http1_and_http2_over_tls() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(&https_config(&[&site], "", ""), &[&backend]).await;
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let resolve = format!("app.test:{}:127.0.0.1", proxy.addr.port());
        let url = format!("https://app.test:{}/", proxy.addr.port());
        let ca = pki.ca_pem.clone();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args(["-sS", flag, "--cacert"])
                .arg(&ca)
                .args(["--resolve", &resolve, "-w", " %{http_version}", &url])
                .output()
                .expect("curl is installed (.ci/run installs it)")
        })
        .await
        .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            out,
            format!("a {version}"),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
async fn a_plain_listener_can_send_everyone_to_https() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\nredirect_to_https = true\nhttps_port = 8443\n\n\
         [upstreams.app]\nservers = [{ address = \"{0}\" }]\n",
        &[&backend],
    )
    .await;
    let answer = support::raw(
        proxy.addr,
        b"GET /a/b?c=d HTTP/1.1\r\nhost: app.test:8080\r\n\r\nHEAD / HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(support::statuses(&answer), [308, 308], "{answer}");
    assert!(
        answer.contains("location: https://app.test:8443/a/b?c=d\r\n"),
        "{answer}"
    );
    assert!(
        answer.contains("location: https://app.test:8443/\r\n"),
        "{answer}"
    );
    assert_eq!(backend.seen.count(), 0);
}

#[tokio::test]
async fn hsts_is_added_to_https_responses() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let proxy = Proxy::start(
        &https_config(
            &[&site],
            "",
            "hsts = \"max-age=31536000; includeSubDomains\"",
        ),
        &[&backend],
    )
    .await;
    let mut stream = tls::connect(proxy.addr, "app.test", client(&pki, &["http/1.1"]))
        .await
        .unwrap();
    let text = tls::exchange(
        &mut stream,
        "GET / HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        text.contains("strict-transport-security: max-age=31536000; includeSubDomains\r\n"),
        "{text}"
    );
}

#[tokio::test]
async fn tls_to_servers_is_verified_and_pooled() {
    let pki = Pki::new();
    let right = pki.server("backend", &["127.0.0.1", "backend.test"], Key::Ecdsa);
    let wrong = pki.server("elsewhere", &["elsewhere.test"], Key::Ecdsa);
    let good = TlsBackend::start("good", &right).await;
    let misnamed = TlsBackend::start("misnamed", &wrong).await;
    let ca = pki.ca_pem.display().to_string();
    let config = format!(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/good\"\nupstream = \"good\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/named\"\nupstream = \"named\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/misnamed\"\nupstream = \"misnamed\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/insecure\"\nupstream = \"insecure\"\n\
         [[listeners.web.routes]]\npath_prefix = \"/untrusted\"\nupstream = \"untrusted\"\n\
         [upstreams.good]\nservers = [{{ address = \"{good}\" }}]\ntls = {{ ca = \"{ca}\" }}\n\
         [upstreams.named]\nservers = [{{ address = \"{good}\" }}]\ntls = {{ ca = \"{ca}\", server_name = \"backend.test\" }}\n\
         [upstreams.misnamed]\nservers = [{{ address = \"{misnamed}\" }}]\ntls = {{ ca = \"{ca}\" }}\n\
         [upstreams.insecure]\nservers = [{{ address = \"{misnamed}\" }}]\ntls = {{ insecure_skip_verify = true }}\n\
         [upstreams.untrusted]\nservers = [{{ address = \"{good}\" }}]\ntls = {{}}\n",
        good = good.addr,
        misnamed = misnamed.addr,
    );
    let proxy = Proxy::start(&config, &[]).await;
    let http = support::client();
    for _ in 0..3 {
        let response = http.get(proxy.url("/good")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.text().await.unwrap(), "good");
    }
    // Kept alive and reused like a plain connection.
    assert_eq!(
        good.connections.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let response = http.get(proxy.url("/named")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "good");
    // A certificate for another name, or from a CA not trusted: 502, never the response.
    for path in ["/misnamed", "/untrusted"] {
        let response = http.get(proxy.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 502, "{path}");
        let text = response.text().await.unwrap();
        assert!(
            text.contains("TLS with the upstream server failed"),
            "{text}"
        );
    }
    let response = http.get(proxy.url("/insecure")).send().await.unwrap();
    assert_eq!(response.text().await.unwrap(), "misnamed");
}

#[tokio::test]
async fn certificates_changed_on_disk_are_served_without_dropping_connections() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    // With an admin listener, to make a rebuild of the running config after the renewal.
    let token = pki.dir.0.join("admin.token");
    std::fs::write(&token, "a-token-for-this-test-only\n").unwrap();
    let admin = support::unused_addr();
    let config = https_config(&[&site], "", "")
        + &format!(
            "[admin]\nbind = \"{admin}\"\ntoken_file = \"{}\"\n",
            token.display()
        );
    let mut process = Process::start(&config, &[&backend]);
    // A new client config each time: a resumed session would not show the certificate.
    let config = || client(&pki, &["http/1.1"]);
    let first_cert = {
        let stream = tls::connect(process.addr, "app.test", config())
            .await
            .unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    // A kept-alive connection from before the change.
    let mut before = tls::connect(process.addr, "app.test", config())
        .await
        .unwrap();
    let keep_alive = b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n";
    before.write_all(keep_alive).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = before.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    // A broken renewal (a key of another certificate): the old one keeps serving.
    let other = pki.server("other", &["app.test"], Key::Ecdsa);
    std::fs::copy(&other.key, &site.key).unwrap();
    process
        .log_from("certificates not reloaded")
        .await
        .contains(&site.key.display().to_string())
        .then_some(())
        .expect("the log names the key file");
    let stream = tls::connect(process.addr, "app.test", config())
        .await
        .unwrap();
    assert_eq!(
        stream.get_ref().1.peer_certificates().unwrap()[0],
        first_cert
    );

    // The matching certificate arrives: new handshakes get it.
    std::fs::copy(&other.cert, &site.cert).unwrap();
    process.log_from("changed on disk: reloaded").await;
    let stream = tls::connect(process.addr, "app.test", config())
        .await
        .unwrap();
    let renewed = stream.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_ne!(renewed, first_cert);

    // A change through the admin API rebuilds the running config: from the renewed
    // certificate, not from the one the file had when it was loaded.
    let changed = reqwest::Client::new()
        .put(format!(
            "http://{admin}/api/upstreams/app/servers/{}/weight",
            backend.addr
        ))
        .bearer_auth("a-token-for-this-test-only")
        .body(r#"{"weight": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let stream = tls::connect(process.addr, "app.test", config())
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.peer_certificates().unwrap()[0], renewed);

    // The connection from before still works.
    before.write_all(keep_alive).await.unwrap();
    let n = before.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    process.signal("TERM");
    process.wait(Duration::from_secs(10));
}

#[tokio::test]
async fn sighup_swaps_certificates_and_refuses_a_broken_one_under_steady_load() {
    let pki = Pki::new();
    let old = pki.server("old", &["app.test"], Key::Ecdsa);
    let new = pki.server("new", &["app.test"], Key::Ecdsa);
    let mismatched = Issued {
        cert: old.cert.clone(),
        key: new.key.clone(),
    };
    let backend = Backend::named("a").await;
    let config = |site: &Issued| format!("workers = 2\n{}", https_config(&[site], "", ""));
    let mut process = Process::start(&config(&old), &[&backend]);
    let addr = process.addr;
    let serial = |der: &rustls::pki_types::CertificateDer<'_>| der.as_ref().to_vec();
    let shown = || async {
        let stream = tls::connect(addr, "app.test", client(&pki, &["http/1.1"]))
            .await
            .unwrap();
        serial(&stream.get_ref().1.peer_certificates().unwrap()[0])
    };
    let old_der = shown().await;

    // HTTP/1.1 requests on new connections, half resumed (one client config, which keeps
    // its sessions), half full handshakes (a config of their own), all through the reloads.
    let load = {
        let resuming = client(&pki, &["http/1.1"]);
        let ca = pki.ca_der();
        // A new config each time: a clone would share the session store, and resume.
        let fresh = move || {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.clone()).unwrap();
            let mut config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        };
        tokio::spawn(async move {
            let (mut failures, mut served) = (0, 0);
            for i in 0..300 {
                let config = if i % 2 == 0 {
                    resuming.clone()
                } else {
                    fresh()
                };
                match tls::connect(addr, "app.test", config).await {
                    Ok(mut stream) => {
                        if tls::get(&mut stream, "app.test", "/").await == (200, "a".into()) {
                            served += 1;
                        } else {
                            failures += 1;
                        }
                    }
                    Err(_) => failures += 1,
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (failures, served)
        })
    };

    // A key that does not match: not applied, the log says which file, the old one serves.
    std::fs::write(
        &process.config,
        support::fill(&config(&mismatched), &[&backend]),
    )
    .unwrap();
    process.signal("HUP");
    let log = process.log_from("config not reloaded").await;
    assert!(log.contains("does not belong"), "{log}");
    assert_eq!(shown().await, old_der);

    std::fs::write(&process.config, support::fill(&config(&new), &[&backend])).unwrap();
    process.signal("HUP");
    process.log_from("SIGHUP: config reloaded").await;
    assert_ne!(shown().await, old_der);

    assert_eq!(load.await.unwrap(), (0, 300));
    process.signal("TERM");
    process.wait(Duration::from_secs(10));
}

#[tokio::test]
async fn an_ocsp_response_file_is_stapled() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    // A real OCSP response for the leaf, signed by the CA, made by openssl's own responder.
    let dir = &pki.dir.0;
    let leaf = dir.join("leaf.pem");
    let chain = std::fs::read_to_string(&site.cert).unwrap();
    let end =
        chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    std::fs::write(&leaf, &chain[..end]).unwrap();
    std::fs::write(dir.join("index.txt"), "").unwrap();
    let ocsp = dir.join("site.ocsp");
    let made = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(["ocsp", "-index", "index.txt", "-rsigner"])
        .arg(&pki.ca_pem)
        .arg("-rkey")
        .arg(&pki.ca_key)
        .arg("-CA")
        .arg(&pki.ca_pem)
        .arg("-issuer")
        .arg(&pki.ca_pem)
        .arg("-cert")
        .arg(&leaf)
        .arg("-respout")
        .arg(&ocsp)
        .args(["-ndays", "1"])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let backend = Backend::named("a").await;
    let config = format!(
        "[listeners.https]\nbind = \"127.0.0.1:0\"\n[[listeners.https.routes]]\nupstream = \"app\"\n\
         [listeners.https.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\", ocsp = \"{}\" }}]\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n",
        site.cert.display(),
        site.key.display(),
        ocsp.display()
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    let addr = proxy.addr;
    let out = tokio::task::spawn_blocking(move || {
        s_client(addr, &["-servername", "app.test", "-status"])
    })
    .await
    .unwrap();
    assert!(out.contains("OCSP Response Status: successful"), "{out}");
    // Without a file, nothing is stapled.
    let plain = Proxy::start(&https_config(&[&site], "", ""), &[&backend]).await;
    let addr = plain.addr;
    let out = tokio::task::spawn_blocking(move || {
        s_client(addr, &["-servername", "app.test", "-status"])
    })
    .await
    .unwrap();
    assert!(out.contains("OCSP response: no response sent"), "{out}");
}

/// `fulcrum check` on a config with a TLS listener using `certificate` (and `extra` lines
/// in its tls table, `route_host` for its route): exit code and stderr.
fn check(pki: &Pki, certificate: &str, extra: &str, route_host: &str) -> (i32, String) {
    let path = pki.dir.0.join("check.toml");
    std::fs::write(
        &path,
        format!(
            "[listeners.https]\nbind = \"127.0.0.1:8443\"\n[[listeners.https.routes]]\n{route_host}upstream = \"app\"\n\
             [listeners.https.tls]\ncertificates = [{certificate}]\n{extra}\n\
             [upstreams.app]\nservers = [{{ address = \"127.0.0.1:9000\" }}]\n"
        ),
    )
    .unwrap();
    let out = support::binary()
        .arg("check")
        .arg("-c")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn entry(cert: &std::path::Path, key: &std::path::Path) -> String {
    format!(
        "{{ cert = \"{}\", key = \"{}\" }}",
        cert.display(),
        key.display()
    )
}

#[test]
fn check_names_the_key_the_file_and_what_is_wrong_with_a_certificate() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let other = pki.server("other", &["app.test"], Key::Ecdsa);
    let dated = |file: &str, adjust: &dyn Fn(&mut rcgen::CertificateParams)| {
        pki.issue(
            file,
            &["app.test"],
            Key::Ecdsa,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            adjust,
        )
    };
    let expired = dated("expired", &|p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let future = dated("future", &|p| {
        p.not_before = rcgen::date_time_ymd(2090, 1, 1);
        p.not_after = rcgen::date_time_ymd(2091, 1, 1);
    });
    let soon = dated("soon", &|p| {
        p.not_after = rcgen::date_time_ymd(1970, 1, 1) + in_days(5);
    });
    // The leaf alone, without the CA after it: the chain is incomplete.
    let leaf_only = pki.dir.0.join("leaf-only.pem");
    let chain = std::fs::read_to_string(&site.cert).unwrap();
    let end =
        chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    std::fs::write(&leaf_only, &chain[..end]).unwrap();
    let not_pem = pki.dir.0.join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let missing = pki.dir.0.join("missing.pem");

    let (code, out) = check(
        &pki,
        &entry(&site.cert, &site.key),
        "",
        "host = \"app.test\"\n",
    );
    assert_eq!(code, 0, "{out}");

    let cases: Vec<(String, &str, &str)> = vec![
        (entry(&site.cert, &other.key), "does not belong", "key = "),
        (entry(&expired.cert, &expired.key), "expired", "cert = "),
        (
            entry(&future.cert, &future.key),
            "not valid until",
            "cert = ",
        ),
        (
            entry(&leaf_only, &site.key),
            "missing intermediate",
            "cert = ",
        ),
        (entry(&not_pem, &site.key), "not.pem", "cert = "),
        (entry(&missing, &site.key), "missing.pem", "cert = "),
        (entry(&site.cert, &not_pem), "not.pem", "key = "),
    ];
    for (certificate, says, key) in cases {
        let (code, out) = check(&pki, &certificate, "", "");
        assert_eq!(code, 1, "{certificate}: {out}");
        assert!(
            out.contains(says),
            "{certificate}: expected {says:?} in {out}"
        );
        // Located at the key of the file at fault: line 6, under `cert = ` or `key = `.
        let line = out.lines().next().unwrap();
        assert!(line.contains("check.toml:6:"), "{line}");
        let col: usize = line.split(':').nth(2).unwrap().parse().unwrap();
        let source = out.lines().nth(1).unwrap();
        let text = source.split(" | ").nth(1).unwrap();
        assert!(
            text[..col - 1].ends_with(key),
            "{key} at column {col} of {text}"
        );
    }

    // A route for a host no certificate covers.
    let (code, out) = check(
        &pki,
        &entry(&site.cert, &site.key),
        "",
        "host = \"other.test\"\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("check.toml:4:") && out.contains("other.test"),
        "{out}"
    );

    // Expiring within 14 days: a warning, and still good.
    let (code, out) = check(&pki, &entry(&soon.cert, &soon.key), "", "");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning:") && out.contains("expires"), "{out}");

    // client_auth without a CA, a CA that is not a certificate, an unknown version.
    for (extra, says) in [
        ("client_auth = \"required\"", "needs client_ca"),
        (
            &format!(
                "client_auth = \"required\"\nclient_ca = \"{}\"",
                not_pem.display()
            ) as &str,
            "not.pem",
        ),
        ("min_version = \"1.1\"", "min_version"),
        ("alpn = [\"h3\"]", "alpn"),
        (
            "client_cert_header = \"Transfer-Encoding\"",
            "writes or removes itself",
        ),
        (
            &format!(
                "client_auth = \"none\"\nclient_ca = \"{}\"",
                pki.ca_pem.display()
            ) as &str,
            "does not ask for client certificates",
        ),
    ] {
        let (code, out) = check(&pki, &entry(&site.cert, &site.key), extra, "");
        assert_eq!(code, 1, "{extra}: {out}");
        assert!(out.contains(says), "{extra}: {out}");
    }
}

/// The time from the Unix epoch to `days` from now.
fn in_days(days: u64) -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + Duration::from_secs(days * 86_400)
}

#[tokio::test]
async fn routes_can_take_only_clients_with_certain_certificate_names() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let alice = pki.client("alice", "alice.example");
    let bob = pki.client("bob", "bob.example");
    let admin = Backend::named("admin").await;
    let public = Backend::named("public").await;
    let config = format!(
        "[listeners.https]\nbind = \"127.0.0.1:0\"\n\
         [[listeners.https.routes]]\nupstream = \"public\"\n\
         [[listeners.https.routes]]\nclient_names = [\"alice.example\"]\nupstream = \"admin\"\n\
         [listeners.https.tls]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n\
         client_auth = \"optional\"\nclient_ca = \"{}\"\n\
         [upstreams.admin]\nservers = [{{ address = \"{{0}}\" }}]\n\
         [upstreams.public]\nservers = [{{ address = \"{{1}}\" }}]\n",
        site.cert.display(),
        site.key.display(),
        pki.ca_pem.display()
    );
    let proxy = Proxy::start(&config, &[&admin, &public]).await;
    let as_client = |who: Option<&Issued>| match who {
        Some(who) => tls::client_with_cert(&pki, who),
        None => client(&pki, &[]),
    };
    for (who, expected) in [
        (Some(&alice), "admin"),
        (Some(&bob), "public"),
        (None, "public"),
    ] {
        let mut stream = tls::connect(proxy.addr, "app.test", as_client(who))
            .await
            .unwrap();
        assert_eq!(tls::get(&mut stream, "app.test", "/").await.1, expected);
    }
}

#[tokio::test]
async fn a_websocket_over_tls_is_tunnelled_both_ways() {
    use futures_util::{SinkExt, StreamExt};
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let ws_addr = support::websocket_echo().await;
    let config = https_config(&[&site], "", "").replace("{0}", &ws_addr.to_string());
    let proxy = Proxy::start(&config, &[]).await;
    let stream = tls::connect(proxy.addr, "app.test", client(&pki, &["http/1.1"]))
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("wss://app.test/chat", stream)
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    // Large enough to span many TLS records each way.
    for size in [5, 70_000, 300_000] {
        let text = "x".repeat(size);
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(echo.into_text().unwrap().len(), size);
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn large_bodies_stream_both_ways_over_tls() {
    use http_body_util::BodyExt;
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    // Echoes the request body back, as it arrives.
    let backend = Backend::with(|req| async move {
        let body = req
            .into_body()
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
        http::Response::new(support::Body::new(body))
    })
    .await;
    let proxy = Proxy::start(&https_config(&[&site], "", ""), &[&backend]).await;
    let mut stream = tls::connect(proxy.addr, "app.test", client(&pki, &["http/1.1"]))
        .await
        .unwrap();
    let size: usize = 8 * 1024 * 1024;
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: app.test\r\ncontent-length: {size}\r\nconnection: close\r\n\r\n"
    );
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let send = async {
        write.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; 64 * 1024];
        for _ in 0..size / chunk.len() {
            write.write_all(&chunk).await.unwrap();
        }
        write.flush().await.unwrap();
    };
    let receive = async {
        let mut all = Vec::new();
        read.read_to_end(&mut all).await.unwrap();
        all
    };
    let ((), all) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send, receive)
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&all[..200.min(all.len())]).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body_start = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &all[body_start..];
    // Chunked or not, every byte of the upload came back.
    assert!(
        body.iter().filter(|&&b| b == b'z').count() == size,
        "{} bytes",
        body.len()
    );
}

#[tokio::test]
async fn a_failed_handshake_is_logged_with_client_sni_and_reason() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let mut process = Process::start(
        &https_config(&[&site], "min_version = \"1.3\"", ""),
        &[&backend],
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let tls12 = Arc::new(
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let refused = tls::connect(process.addr, "app.test", tls12).await;
    assert!(refused.is_err());
    let line = process.log_from("TLS handshake failed").await;
    let line = line.lines().next().unwrap();
    assert!(line.contains("client=127.0.0.1:"), "{line}");
    assert!(line.contains("sni=\"app.test\""), "{line}");
    assert!(line.contains("reason="), "{line}");
    // And the process serves on.
    let mut stream = tls::connect(process.addr, "app.test", client(&pki, &[]))
        .await
        .unwrap();
    assert_eq!(tls::get(&mut stream, "app.test", "/").await.0, 200);
    process.signal("TERM");
    process.wait(Duration::from_secs(10));
}

#[tokio::test]
async fn a_plain_listener_also_drops_a_client_certificate_header_sent_by_the_client() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let response = support::client()
        .get(proxy.url("/"))
        .header("X-Forwarded-Client-Cert", "Subject=\"CN=admin\"")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        !backend
            .seen
            .last()
            .headers
            .contains_key("x-forwarded-client-cert")
    );
}

#[tokio::test]
async fn sessions_resume_across_a_reload_but_not_once_client_certificates_are_required() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let open = support::fill(&https_config(&[&site], "", ""), &[&backend]);
    let proxy = Proxy::start(&open, &[]).await;
    let config = client(&pki, &["http/1.1"]);
    let mut before = tls::connect(proxy.addr, "app.test", config.clone())
        .await
        .unwrap();
    assert_eq!(tls::get(&mut before, "app.test", "/").await.0, 200);
    // The same settings again: the ticket key carries over, the session resumes.
    proxy
        .server
        .reload(fulcrum::config::parse("test.toml", &open).unwrap())
        .unwrap();
    let mut again = tls::connect(proxy.addr, "app.test", config.clone())
        .await
        .unwrap();
    assert_eq!(tls::get(&mut again, "app.test", "/").await.0, 200);
    assert_eq!(
        again.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    let required = support::fill(
        &https_config(
            &[&site],
            &format!(
                "client_auth = \"required\"\nclient_ca = \"{}\"",
                pki.ca_pem.display()
            ),
            "",
        ),
        &[&backend],
    );
    proxy
        .server
        .reload(fulcrum::config::parse("test.toml", &required).unwrap())
        .unwrap();
    // The client offers its old session and no certificate: no request gets through.
    let count = backend.seen.count();
    if let Ok(mut stream) = tls::connect(proxy.addr, "app.test", config).await {
        assert_ne!(
            stream.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        assert_eq!(tls::get(&mut stream, "app.test", "/").await.0, 0);
    }
    assert_eq!(backend.seen.count(), count);
}

#[tokio::test]
async fn listeners_sharing_a_certificate_file_both_take_its_renewal() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let renewed = pki.server("renewed", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let tls_table = format!(
        "certificates = [{{ cert = \"{}\", key = \"{}\" }}]",
        site.cert.display(),
        site.key.display()
    );
    let config = format!(
        "[listeners.one]\nbind = \"127.0.0.1:0\"\n[[listeners.one.routes]]\nupstream = \"app\"\n\
         [listeners.one.tls]\n{tls_table}\n\
         [listeners.two]\nbind = \"127.0.0.2:0\"\n[[listeners.two.routes]]\nupstream = \"app\"\n\
         [listeners.two.tls]\n{tls_table}\n\
         [upstreams.app]\nservers = [{{ address = \"{{0}}\" }}]\n"
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    let addrs = proxy.server.local_addrs().to_vec();
    let shown = |addr| {
        let config = client(&pki, &[]);
        async move {
            let stream = tls::connect(addr, "app.test", config).await.unwrap();
            stream.get_ref().1.peer_certificates().unwrap()[0].clone()
        }
    };
    let old = shown(addrs[0]).await;
    // Written whole and renamed into place, as renewal tools do.
    for (from, to) in [(&renewed.key, &site.key), (&renewed.cert, &site.cert)] {
        let part = to.with_extension("part");
        std::fs::copy(from, &part).unwrap();
        std::fs::rename(&part, to).unwrap();
    }
    for addr in addrs {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while shown(addr).await == old {
            assert!(
                std::time::Instant::now() < deadline,
                "{addr} kept the old certificate"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn own_answers_over_https_carry_hsts_and_redirects_need_a_host() {
    let pki = Pki::new();
    let site = pki.server("site", &["app.test"], Key::Ecdsa);
    let backend = Backend::named("a").await;
    let config = https_config(&[&site], "", "hsts = \"max-age=60\"").replace(
        "upstream = \"app\"\n",
        "path_prefix = \"/only\"\nupstream = \"app\"\n",
    );
    let proxy = Proxy::start(&config, &[&backend]).await;
    let mut stream = tls::connect(proxy.addr, "app.test", client(&pki, &["http/1.1"]))
        .await
        .unwrap();
    let text = tls::exchange(
        &mut stream,
        "GET /elsewhere HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(
        text.contains("strict-transport-security: max-age=60\r\n"),
        "{text}"
    );

    let redirecting = Proxy::start(
        "[listeners.web]\nbind = \"127.0.0.1:0\"\nredirect_to_https = true\n\
         [upstreams.app]\nservers = [{ address = \"{0}\" }]\n",
        &[&backend],
    )
    .await;
    // No name in Host: `https:///evil.example/x` would send browsers to evil.example.
    let answer = support::raw(
        redirecting.addr,
        b"GET /evil.example/x HTTP/1.1\r\nhost: :80\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(!answer.contains("location"), "{answer}");
    assert!(!answer.starts_with("HTTP/1.1 3"), "{answer}");
    let answer = support::raw(
        redirecting.addr,
        b"OPTIONS * HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(
        answer.contains("location: https://app.test/\r\n"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_client_certificate_header_in_any_spelling_is_dropped() {
    let backend = Backend::named("a").await;
    let proxy = Proxy::simple(&[&backend], "").await;
    let answer = support::raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nhost: a\r\nX_Forwarded_Client_Cert: Subject=\"CN=admin\"\r\nx-forwarded-client-cert: x\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = backend.seen.last();
    assert!(
        !seen
            .headers
            .keys()
            .any(|k| k.as_str().replace('_', "-") == "x-forwarded-client-cert"),
        "{:?}",
        seen.headers
    );
}
