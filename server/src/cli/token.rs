//! `studio token`: users' API tokens in the server's store. A token is printed once, at
//! creation, and kept only as its hash; the server reads the store on every request, so a token
//! created or revoked here counts at once, without a restart.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};

use crate::config::store_location;
use crate::files::DataDir;
use crate::store::{Location, Store};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The server's data directory, where its database is.
    #[arg(long, env = "STUDIO_DATA_DIR", default_value = "./data", global = true)]
    pub data_dir: PathBuf,
    /// The server's store when it is not `studio.db` in the data directory (as `serve --database`).
    #[arg(long, env = "STUDIO_DATABASE", hide_env_values = true, global = true)]
    pub database: Option<String>,
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Debug, Subcommand)]
pub enum Action {
    /// Creates a token for a user and prints it (only this once). The user's token sees that user's
    /// jobs, images and conversations only; with --admin, everyone's.
    Create {
        /// Letters, digits, `-`, `_`, `.`, `@`.
        #[arg(long)]
        user: String,
        #[arg(long)]
        admin: bool,
    },
    /// Lists the tokens: id, user, whether admin, when created (never the tokens themselves).
    List,
    /// Revokes a token by its id, or every token of a user by the user's name.
    Revoke { id_or_user: String },
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let location = store_location(&args.data_dir, args.database.as_deref());
    if let Location::File(_) = location {
        DataDir::create(&args.data_dir)
            .with_context(|| format!("opening the data directory {}", args.data_dir.display()))?;
    }
    let store = Store::connect(&location)?;
    match args.action {
        Action::Create { user, admin } => {
            let (id, token) = store.create_token(&user, admin)?;
            eprintln!(
                "token {id} for {}{}; it is shown only now: keep it",
                user.trim(),
                if admin { " (admin)" } else { "" }
            );
            println!("{token}");
        }
        Action::List => {
            for token in store.tokens()? {
                println!(
                    "{}\t{}\t{}\t{}",
                    token.id,
                    token.user,
                    if token.admin { "admin" } else { "user" },
                    token.created_at
                );
            }
        }
        Action::Revoke { id_or_user } => {
            let revoked = store.revoke_tokens(&id_or_user)?;
            anyhow::ensure!(
                revoked > 0,
                "no token has the id or user {id_or_user:?}; `studio token list` shows them"
            );
            eprintln!("revoked {revoked} token(s)");
        }
    }
    Ok(())
}
