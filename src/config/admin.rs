//! Checking the `[admin]` section: where the admin listener binds, and the bearer token
//! that state-changing calls need, read from its file now so that a bad one stops the
//! start (or the reload) rather than the first call.

use std::collections::HashMap;
use std::net::SocketAddr;

use toml::Spanned;

use super::{Checker, file};
use crate::config::model::{AdminConfig, AdminToken};

impl Checker {
    /// `binds`: the listeners' addresses, which the admin listener must not take.
    pub(super) fn admin(
        &mut self,
        admin: Spanned<file::Admin>,
        binds: &HashMap<SocketAddr, String>,
    ) -> Option<AdminConfig> {
        let admin = admin.into_inner();
        let bind = self.socket_addr(&admin.bind, "bind");
        // Port 0 takes whatever port is free: never one a listener has.
        if let Some(bind) = bind
            && bind.port() != 0
            && let Some(listener) = binds.get(&bind)
        {
            self.error(
                admin.bind.span(),
                format!(
                    "the admin listener binds {bind}, which listener `{listener}` already binds"
                ),
            );
        }
        let token = admin.token_file.as_ref().and_then(|f| self.admin_token(f));
        Some(AdminConfig {
            bind: bind?,
            token_file: admin.token_file.map(|f| self.dir.join(f.into_inner())),
            token,
        })
    }

    /// The token in `token_file` (relative to the config's directory), surrounding
    /// whitespace trimmed. The token itself is never repeated in an error.
    fn admin_token(&mut self, token_file: &Spanned<String>) -> Option<AdminToken> {
        let path = self.dir.join(token_file.get_ref());
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) => {
                self.error(
                    token_file.span(),
                    format!("token_file `{}` cannot be read: {e}", path.display()),
                );
                return None;
            }
        };
        let text = text.trim();
        let token = AdminToken::new(text);
        if token.is_none() {
            let count = text.chars().count();
            let what = if count == 0 {
                "is empty".to_string()
            } else {
                format!("holds {count} characters")
            };
            self.error(
                token_file.span(),
                format!(
                    "token_file `{}` {what}: a token needs at least {}, such as the output of `openssl rand -hex 32`",
                    path.display(),
                    AdminToken::MIN_CHARS
                ),
            );
        }
        token
    }
}
