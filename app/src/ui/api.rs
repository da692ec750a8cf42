//! Calls to the studio's public API from the browser: JSON over fetch, uploads with progress over
//! XMLHttpRequest (fetch cannot report upload progress), WebSocket addresses. Every failure becomes one
//! sentence for people: the server's own error message when it sent one.

use gloo_net::http::{Request, Response};
use leptos::prelude::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use wasm_bindgen::{JsCast, JsValue};

use crate::ErrorBody;

/// A value on its way from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Load<T> {
    Loading,
    Ready(T),
    Failed(String),
}

impl<T> From<Result<T, String>> for Load<T> {
    fn from(result: Result<T, String>) -> Self {
        match result {
            Ok(value) => Load::Ready(value),
            Err(message) => Load::Failed(message),
        }
    }
}

/// Fetches `path` into `target` in the background (browser only: call it from effects and handlers).
pub fn load_into<T>(path: String, target: RwSignal<Load<T>>)
where
    T: DeserializeOwned + Send + Sync + 'static,
{
    leptos::task::spawn_local(async move { target.set(get(&path).await.into()) });
}

pub async fn get<T: DeserializeOwned>(path: &str) -> Result<T, String> {
    let response = Request::get(path).send().await.map_err(unreachable)?;
    read(path, response).await
}

pub async fn post<B: Serialize, T: DeserializeOwned>(path: &str, body: &B) -> Result<T, String> {
    let response = Request::post(path)
        .json(body)
        .map_err(|e| e.to_string())?
        .send()
        .await
        .map_err(unreachable)?;
    read(path, response).await
}

/// A POST without a body (cancel, resume); the answer's JSON is not needed.
pub async fn post_empty(path: &str) -> Result<(), String> {
    let response = Request::post(path).send().await.map_err(unreachable)?;
    read::<serde_json::Value>(path, response).await.map(drop)
}

/// A DELETE; the answer (204, no body) is not needed.
pub async fn delete(path: &str) -> Result<(), String> {
    let response = Request::delete(path).send().await.map_err(unreachable)?;
    let status = response.status();
    ask_for_token_on(status);
    if response.ok() {
        return Ok(());
    }
    let text = response.text().await.map_err(unreachable)?;
    Err(error_message(status, &text))
}

/// A 401 means this studio has an access token the browser lacks: off to the token page, and back here after.
fn ask_for_token_on(status: u16) {
    if status != 401 {
        return;
    }
    let location = window().location();
    let here = format!(
        "{}{}",
        location.pathname().unwrap_or_default(),
        location.search().unwrap_or_default()
    );
    if here.starts_with("/studio/token") {
        return;
    }
    let next = String::from(js_sys::encode_uri_component(&here));
    let _ = location.set_href(&format!("/studio/token?next={next}"));
}

async fn read<T: DeserializeOwned>(path: &str, response: Response) -> Result<T, String> {
    let status = response.status();
    ask_for_token_on(status);
    let text = response.text().await.map_err(unreachable)?;
    if response.ok() {
        serde_json::from_str(&text)
            .map_err(|e| format!("the studio answered {path} with unexpected data: {e}"))
    } else {
        Err(error_message(status, &text))
    }
}

/// The API's error message (`{"error": {"code", "message"}}`), or the bare status for anything else.
pub fn error_message(status: u16, body: &str) -> String {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(body) => body.error.message,
        Err(_) => format!("the studio answered HTTP {status}"),
    }
}

fn unreachable(e: gloo_net::Error) -> String {
    format!("the studio could not be reached ({e}); is the server running?")
}

/// `ws://` or `wss://` address of a stream on this page's host.
pub fn ws_url(path: &str) -> String {
    let location = window().location();
    let scheme = match location.protocol().ok().as_deref() {
        Some("https:") => "wss",
        _ => "ws",
    };
    let host = location.host().unwrap_or_default();
    format!("{scheme}://{host}{path}")
}

pub fn png_data_url(base64: &str) -> String {
    format!("data:image/png;base64,{base64}")
}

/// POSTs a form with XMLHttpRequest, reporting the upload's progress (0..1) as it goes, and answers with the
/// response's JSON or its error message.
pub async fn upload<T: DeserializeOwned>(
    path: &str,
    form: &web_sys::FormData,
    on_progress: impl Fn(f64) + 'static,
) -> Result<T, String> {
    use wasm_bindgen::closure::Closure;
    let js_error = |e: JsValue| format!("the browser refused the upload: {e:?}");
    let xhr = web_sys::XmlHttpRequest::new().map_err(js_error)?;
    xhr.open("POST", path).map_err(js_error)?;
    let progress =
        Closure::<dyn FnMut(web_sys::ProgressEvent)>::new(move |event: web_sys::ProgressEvent| {
            if event.length_computable() && event.total() > 0.0 {
                on_progress(event.loaded() / event.total());
            }
        });
    xhr.upload()
        .map_err(js_error)?
        .set_onprogress(Some(progress.as_ref().unchecked_ref()));
    let finished = js_sys::Promise::new(&mut |resolve, reject| {
        let done = Closure::once_into_js(move || drop(resolve.call0(&JsValue::NULL)));
        let failed = Closure::once_into_js(move || drop(reject.call0(&JsValue::NULL)));
        xhr.set_onload(Some(done.unchecked_ref()));
        xhr.set_onerror(Some(failed.unchecked_ref()));
    });
    xhr.send_with_opt_form_data(Some(form)).map_err(js_error)?;
    let outcome = wasm_bindgen_futures::JsFuture::from(finished).await;
    // Kept alive until the request is over; dropping it earlier would leave the browser calling freed code.
    drop(progress);
    if outcome.is_err() {
        return Err(
            "the upload was interrupted (the connection failed or the server stopped); try again"
                .into(),
        );
    }
    let status = xhr.status().unwrap_or(0);
    ask_for_token_on(status);
    let text = xhr.response_text().ok().flatten().unwrap_or_default();
    if (200..300).contains(&status) {
        serde_json::from_str(&text)
            .map_err(|e| format!("the studio answered {path} with unexpected data: {e}"))
    } else {
        Err(error_message(status, &text))
    }
}

/// Copies text to the clipboard; failures (no permission, no secure context) are reported to the caller.
pub async fn copy_text(text: &str) -> Result<(), String> {
    let clipboard = window().navigator().clipboard();
    wasm_bindgen_futures::JsFuture::from(clipboard.write_text(text))
        .await
        .map(drop)
        .map_err(|_| "the browser did not allow copying; select the text instead".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_prefers_the_servers_words() {
        let body =
            r#"{"error": {"code": "unavailable", "message": "LoRA training not available"}}"#;
        assert_eq!(error_message(503, body), "LoRA training not available");
        assert_eq!(
            error_message(502, "<html>bad gateway</html>"),
            "the studio answered HTTP 502"
        );
    }
}
