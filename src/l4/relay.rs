//! (temporary, replaced by the "relay" helper's module at the merge) Relaying bytes both
//! ways between a client and a server.

use std::time::Duration;

use tokio::net::TcpStream;

#[derive(Debug)]
pub enum End {
    Closed,
    ClientReset,
    ServerReset,
    Idle,
    Refused,
    Failed(String),
}

pub struct Relayed {
    pub from_client: u64,
    pub from_server: u64,
    pub end: End,
}

pub async fn relay(
    mut client: TcpStream,
    mut server: TcpStream,
    idle_timeout: Duration,
    refuse_first: Option<fn(&[u8]) -> bool>,
) -> Relayed {
    if let Some(refuse) = refuse_first {
        let mut first = [0u8; 16];
        let _ = tokio::time::timeout(idle_timeout, client.readable()).await;
        if let Ok(n) = client.peek(&mut first).await
            && refuse(&first[..n])
        {
            for s in [&client, &server] {
                let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            }
            return Relayed {
                from_client: 0,
                from_server: 0,
                end: End::Refused,
            };
        }
    }
    match tokio::io::copy_bidirectional(&mut client, &mut server).await {
        Ok((from_client, from_server)) => Relayed {
            from_client,
            from_server,
            end: End::Closed,
        },
        Err(e) => Relayed {
            from_client: 0,
            from_server: 0,
            end: End::Failed(e.to_string()),
        },
    }
}
