//! The engine's chat models behind the server's `Chat` seam: a local GGUF model (loaded on first use,
//! fetched from the hub first when a hub preset names it) or an OpenAI-compatible server.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use engine::chat::{Answer, GgufChat, LanguageModel, OpenAiChat, SamplingSettings, Turn};
use engine::device::DeviceChoice;
use engine::hub::Hub;

use crate::config::ChatConfig;
use crate::jobs::capability::{Chat, Control};

/// Where the model comes from, checked at start.
enum Backend {
    /// A GGUF already on disk.
    File(PathBuf),
    /// A hub preset or file, fetched at the first answer.
    Hub,
    Server,
}

pub struct EngineChat {
    setting: String,
    device: DeviceChoice,
    backend: Backend,
    /// The model, once loaded; the lock also makes answers take turns.
    model: Mutex<Option<Box<dyn LanguageModel>>>,
}

/// The chat the settings name. A local model's file is checked here, so that a missing default model is
/// reported by `/health` at once; the model itself loads at the first answer.
pub fn load(config: &ChatConfig) -> Result<EngineChat> {
    if let Some(url) = &config.chat_server {
        let model = config.chat_server_model.clone().context(
            "--chat-server needs --chat-server-model: the model name to ask that server for",
        )?;
        let key = config
            .chat_server_key
            .as_ref()
            .map(|k| k.expose().to_owned());
        let chat: Box<dyn LanguageModel> = Box::new(OpenAiChat::new(url, &model, key));
        return Ok(EngineChat {
            setting: model,
            device: config.chat_device,
            backend: Backend::Server,
            model: Mutex::new(Some(chat)),
        });
    }
    let setting = config.chat_model.clone();
    let offline = Hub {
        offline: true,
        ..Hub::from_env()
    };
    // Resolving against an offline hub never downloads: a file on disk (or in the cache) is found, a
    // missing installed preset is an error, and a hub file not yet cached waits for the first answer.
    let backend = match engine::chat::presets::resolve(&setting, &offline, Arc::new(|_| {})) {
        Ok(path) => Backend::File(path),
        Err(err) => {
            let installed = engine::chat::presets::preset(&setting)
                .is_some_and(|p| matches!(p.source, engine::chat::LmSource::Installed(_)));
            let on_hub = setting.contains(':')
                || engine::chat::presets::preset(&setting)
                    .is_some_and(|p| matches!(p.source, engine::chat::LmSource::Hub { .. }));
            if installed || !on_hub {
                return Err(err);
            }
            Backend::Hub
        }
    };
    Ok(EngineChat {
        setting,
        device: config.chat_device,
        backend,
        model: Mutex::new(None),
    })
}

impl EngineChat {
    fn load_model(&self) -> Result<Box<dyn LanguageModel>> {
        let path = match &self.backend {
            Backend::File(path) => path.clone(),
            Backend::Hub => engine::chat::presets::resolve(
                &self.setting,
                &Hub::from_env(),
                Arc::new(|p| {
                    tracing::debug!(
                        "chat model download: {} {}/{}",
                        p.file,
                        p.file_bytes,
                        p.file_total
                    )
                }),
            )?,
            Backend::Server => unreachable!("a server backend is made at start"),
        };
        let device = self.device.select()?;
        tracing::info!(
            "loading the chat model {} from {}",
            self.setting,
            path.display()
        );
        let model = GgufChat::load(&path, &self.setting, &device)
            .with_context(|| format!("loading the chat model {}", self.setting))?;
        Ok(Box::new(model))
    }
}

impl Chat for EngineChat {
    fn model(&self) -> String {
        self.setting.clone()
    }

    fn answer(
        &self,
        turns: &[Turn],
        settings: &SamplingSettings,
        on_text: &mut dyn FnMut(&str) -> Control,
    ) -> Result<Answer> {
        let mut slot = self
            .model
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            *slot = Some(self.load_model()?);
        }
        let model = slot.as_mut().expect("loaded above");
        model.answer(turns, settings, &mut |piece| match on_text(piece) {
            Control::Continue => ControlFlow::Continue(()),
            Control::Cancel => ControlFlow::Break(()),
        })
    }
}
