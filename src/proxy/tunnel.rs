//! After an upstream answered `101 Switching Protocols`, both connections stop speaking HTTP
//! and their bytes are copied through unchanged (WebSocket and other upgrades).

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

pub fn spawn(client: OnUpgrade, upstream: OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            Ok((up, down)) => tracing::debug!(
                client_to_upstream = up,
                upstream_to_client = down,
                "tunnel closed"
            ),
            Err(e) => tracing::debug!(error = %e, "tunnel ended with an error"),
        }
    });
}
