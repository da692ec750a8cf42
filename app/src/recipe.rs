//! A generation's recipe: what a PNG of the studio carries in its text chunks (written and read by the
//! server's `recipe` module; the format is in docs/server.md#recipes), and `POST /recipe/`'s types.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Everything needed to make an image again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Recipe {
    /// The prompt as sent to the model (LoRA trigger words included).
    pub prompt: String,
    pub seed: u64,
    /// The preset id (`GET /models/`), or the model's name in a `parameters` line of another tool.
    pub model: String,
    /// The LoRAs applied, in order, each with its scale.
    #[serde(default)]
    pub loras: Vec<RecipeLora>,
    pub steps: u32,
    pub guidance: f32,
    pub width: u32,
    pub height: u32,
    /// The image it started from, when it started from one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<RecipeInput>,
    /// The studio's version that made it (absent when read from another tool's `parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub studio: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecipeLora {
    pub name: String,
    pub scale: f32,
}

/// The input image of an image-to-image, inpainting or edit generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecipeInput {
    /// The generation it came from (`image_job`); absent for an uploaded image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Which image of that job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    pub strength: f32,
    /// Whether a mask chose the part repainted.
    #[serde(default)]
    pub masked: bool,
}

/// `POST /recipe/`: a PNG whose recipe to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecipeRequest {
    /// Base64 PNG or JPEG (a `data:image/...;base64,` prefix allowed).
    pub image: String,
}

/// `POST /recipe/`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RecipeResponse {
    /// The recipe, when the image carries one: the studio's JSON chunk, else another tool's
    /// `parameters` line; absent for an image without either (it can still be an input image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<Recipe>,
    /// `flux-studio` or `parameters`: which chunk the recipe was read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub width: u32,
    pub height: u32,
}
