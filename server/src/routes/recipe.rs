//! `POST /recipe/`: the settings a PNG carries (the studio's recipe, or another tool's `parameters`
//! line), so that dropping an image into the chat can restore them.

use app::{ErrorBody, RecipeRequest, RecipeResponse};
use axum::Json;

use super::ApiJson;
use crate::error::ApiError;

/// Reads the recipe of a PNG (`image`: base64, a data URL allowed); a JPEG, or a PNG without one,
/// answers without `recipe` and with its size.
#[utoipa::path(post, path = "/recipe/", tag = "generate", request_body = RecipeRequest, responses(
    (status = 200, body = RecipeResponse),
    (status = 400, description = "Malformed JSON", body = ErrorBody),
    (status = 422, description = "Not base64 of a PNG or JPEG image", body = ErrorBody),
))]
pub async fn read(
    ApiJson(request): ApiJson<RecipeRequest>,
) -> Result<Json<RecipeResponse>, ApiError> {
    tokio::task::spawn_blocking(move || {
        let decoded = crate::input::decode_base64_image("image", &request.image)?;
        let bytes = decoded.bytes;
        let found = if image::guess_format(&bytes).ok() == Some(image::ImageFormat::Png) {
            crate::recipe::read_png(&bytes)
                .map_err(|e| ApiError::validation(format!("image is not a readable PNG: {e:#}")))?
        } else {
            None
        };
        Ok(Json(RecipeResponse {
            source: found.as_ref().map(|(_, f)| f.as_str().to_string()),
            recipe: found.map(|(r, _)| r),
            width: decoded.image.width(),
            height: decoded.image.height(),
        }))
    })
    .await
    .unwrap_or_else(|err| Err(ApiError::internal("reading the recipe", err)))
}
