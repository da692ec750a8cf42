//! The OpenAPI document, generated from the API types and handler annotations, and `/docs`: a page
//! rendered here from that document, so it works offline with no bundled JavaScript.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::response::Html;
use axum::Json;
use serde_json::Value;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "FLUX studio API",
        description = "Text-to-image, prompt classification, LoRA training and a chat with a language model. \
        Every path also answers without its trailing slash. Errors are `{\"error\": {\"code\", \"message\"}}`."
    ),
    paths(
        super::generate::generate,
        super::recipe::read,
        super::classify::classify,
        super::chat::chat,
        super::chat::prompt,
        super::chat::list,
        super::chat::create,
        super::chat::show,
        super::chat::delete,
        super::chat::add_image,
        super::train::train,
        super::train::status,
        super::train::resume,
        super::jobs::list,
        super::jobs::show,
        super::jobs::cancel,
        super::downloads::image,
        super::downloads::image_at,
        super::downloads::sample,
        super::downloads::list_loras,
        super::downloads::lora,
        super::info::health,
        super::info::models,
        super::info::settings,
        super::info::update_settings,
        super::ws::generation,
        super::ws::training,
        super::ws::chat,
    ),
    components(schemas(
        app::JobEvent,
        app::EventBody,
        app::ClientMessage,
        app::ChatEvent,
        app::ChatClientMessage
    ))
)]
struct ApiDoc;

/// The OpenAPI document, built once.
pub fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|e| {
            tracing::error!("serializing the OpenAPI document: {e}");
            Value::Null
        })
    })
}

pub async fn openapi_json() -> Json<&'static Value> {
    Json(openapi())
}

pub async fn page() -> Html<&'static str> {
    static PAGE: OnceLock<String> = OnceLock::new();
    Html(PAGE.get_or_init(|| render(openapi())))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `#/components/schemas/Name` -> a link to that schema's section.
fn schema_link(schema: &Value) -> String {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = escape(reference.rsplit('/').next().unwrap_or(reference));
            format!("<a href=\"#schema-{name}\">{name}</a>")
        }
        None => format!("<code>{}</code>", escape(&schema.to_string())),
    }
}

fn content_links(content: Option<&Value>) -> String {
    let Some(Value::Object(types)) = content else {
        return String::new();
    };
    types
        .iter()
        .map(|(mime, body)| {
            format!(
                "{} <small>({})</small>",
                body.get("schema").map(schema_link).unwrap_or_default(),
                escape(mime)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn render(doc: &Value) -> String {
    let text = |v: &Value, key: &str| escape(v.get(key).and_then(Value::as_str).unwrap_or(""));
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>FLUX studio API</title><style>\
         body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}\
         .op{border:1px solid #ccc;border-radius:6px;padding:.5rem 1rem;margin:1rem 0}\
         .method{font-weight:bold;text-transform:uppercase;display:inline-block;min-width:4rem}\
         pre{background:#f5f5f5;padding:.5rem;overflow:auto}td{padding:.1rem .6rem;vertical-align:top}\
         </style></head><body>",
    );
    let info = &doc["info"];
    let _ = write!(
        html,
        "<h1>{} <small>{}</small></h1><p>{}</p>",
        text(info, "title"),
        text(info, "version"),
        text(info, "description")
    );
    html.push_str("<p>The machine-readable document is at <a href=\"/openapi.json\">/openapi.json</a>.</p><h2>Routes</h2>");
    if let Some(Value::Object(paths)) = doc.get("paths") {
        for (path, item) in paths {
            let Value::Object(operations) = item else {
                continue;
            };
            for (method, op) in operations {
                let _ = write!(
                    html,
                    "<div class=\"op\"><p><span class=\"method\">{}</span> <code>{}</code> — {}</p>",
                    escape(method),
                    escape(path),
                    text(op, "summary")
                );
                let description = text(op, "description");
                if !description.is_empty() {
                    let _ = write!(html, "<p>{description}</p>");
                }
                let body = content_links(op.pointer("/requestBody/content"));
                if !body.is_empty() {
                    let _ = write!(html, "<p>Request body: {body}</p>");
                }
                html.push_str("<table>");
                if let Some(Value::Object(responses)) = op.get("responses") {
                    for (status, response) in responses {
                        let _ = write!(
                            html,
                            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                            escape(status),
                            text(response, "description"),
                            content_links(response.get("content"))
                        );
                    }
                }
                html.push_str("</table></div>");
            }
        }
    }
    html.push_str("<h2>Schemas</h2>");
    if let Some(Value::Object(schemas)) = doc.pointer("/components/schemas") {
        for (name, schema) in schemas {
            let pretty = serde_json::to_string_pretty(schema).unwrap_or_default();
            let _ = write!(
                html,
                "<h3 id=\"schema-{0}\">{0}</h3><pre>{1}</pre>",
                escape(name),
                escape(&pretty)
            );
        }
    }
    html.push_str("</body></html>");
    html
}
