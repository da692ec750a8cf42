//! The editing components: the pending input image above the message box, the edit dialog with its mask
//! brush, and images dropped or pasted into the chat (docs/ui.md#editing-images).

use leptos::ev::PointerEvent;
use leptos::prelude::*;
use wasm_bindgen::JsCast;

use super::edit::{EditTarget, InputImage, InputSource};
use super::state::ChatState;
use crate::ui::api;
use crate::{RecipeRequest, RecipeResponse};

/// A dropped or pasted file: a PNG with a recipe restores its settings, any other image becomes the
/// next message's input image.
pub(super) fn accept_file(chat: ChatState, file: web_sys::File) {
    leptos::task::spawn_local(async move {
        let outcome = async {
            let data_url = read_data_url(&file).await?;
            let answer: RecipeResponse = api::post(
                "/recipe/",
                &RecipeRequest {
                    image: data_url.clone(),
                },
            )
            .await?;
            Ok::<_, String>((data_url, answer))
        }
        .await;
        match outcome {
            Ok((
                _,
                RecipeResponse {
                    recipe: Some(recipe),
                    ..
                },
            )) => chat.restore(recipe),
            Ok((data_url, answer)) => {
                chat.input.set(Some(InputImage {
                    url: data_url.clone(),
                    source: InputSource::Upload(data_url),
                    width: answer.width,
                    height: answer.height,
                }));
                chat.notice.set(Some(
                    "The image is the input of your next message: describe the change.".into(),
                ));
            }
            Err(message) => chat
                .notice
                .set(Some(format!("That file cannot be used: {message}"))),
        }
    });
}

/// A file's contents as a `data:` URL.
async fn read_data_url(file: &web_sys::File) -> Result<String, String> {
    let reader = web_sys::FileReader::new().map_err(|e| format!("{e:?}"))?;
    let done = js_sys::Promise::new(&mut |resolve, reject| {
        reader.set_onload(Some(&resolve));
        reader.set_onerror(Some(&reject));
    });
    reader
        .read_as_data_url(file)
        .map_err(|_| "the browser could not read the file".to_string())?;
    wasm_bindgen_futures::JsFuture::from(done)
        .await
        .map_err(|_| "the browser could not read the file".to_string())?;
    reader
        .result()
        .ok()
        .and_then(|r| r.as_string())
        .ok_or_else(|| "the browser could not read the file".to_string())
}

/// The first file of a drop or paste.
pub(super) fn first_file(data: Option<web_sys::DataTransfer>) -> Option<web_sys::File> {
    data?.files()?.get(0)
}

/// How far an edit departs from its input (the settings' strength, shared by the input chip and the
/// edit dialog), with its value.
#[component]
fn StrengthSlider(chat: ChatState) -> impl IntoView {
    view! {
        <label>
            "Strength"
            <input
                type="range"
                min="0.05"
                max="1"
                step="0.05"
                prop:value=move || chat.settings.strength.get().to_string()
                on:input=move |ev| {
                    if let Ok(v) = event_target_value(&ev).parse() {
                        chat.settings.strength.set(v);
                    }
                }
            />
            {move || format!("{:.2}", chat.settings.strength.get())}
        </label>
    }
}

/// The pending input image above the message box: its thumbnail, strength, and a way to drop it.
#[component]
pub(super) fn InputChip(chat: ChatState) -> impl IntoView {
    move || {
        chat.input.get().map(|input| {
            let target = EditTarget {
                input: input.clone(),
                prompt: String::new(),
                model: None,
            };
            view! {
                <div class="input-chip" data-testid="input-image">
                    <img src=input.url.clone() alt="Input image" />
                    <span>{format!("Input image {}×{}", input.width, input.height)}</span>
                    <StrengthSlider chat />
                    <button
                        type="button"
                        class="secondary"
                        on:click=move |_| chat.editing.set(Some(target.clone()))
                    >
                        "Paint a mask"
                    </button>
                    <button
                        type="button"
                        class="secondary"
                        aria-label="Remove the input image"
                        on:click=move |_| chat.input.set(None)
                    >
                        "×"
                    </button>
                </div>
            }
        })
    }
}

/// Edit an image: an instruction (or inpainting prompt), an optional mask painted with a brush over the
/// image, and the strength; the result joins the thread beside the original.
#[component]
pub(super) fn EditDialog(chat: ChatState) -> impl IntoView {
    move || {
        chat.editing.get().map(|target| {
            view! { <EditPanel chat target /> }
        })
    }
}

#[component]
fn EditPanel(chat: ChatState, target: EditTarget) -> impl IntoView {
    let canvas = NodeRef::<leptos::html::Canvas>::new();
    let instruction = RwSignal::new(String::new());
    let brush = RwSignal::new(12.0_f64);
    let painting = RwSignal::new(false);
    let painted = RwSignal::new(false);
    let (width, height) = (target.input.width, target.input.height);
    let context = move || {
        canvas
            .get()?
            .get_context("2d")
            .ok()
            .flatten()?
            .dyn_into::<web_sys::CanvasRenderingContext2d>()
            .ok()
    };
    // A white disc at the pointer, in the image's pixels (the canvas is shown scaled).
    let dab = move |ev: &PointerEvent| {
        let (Some(element), Some(ctx)) = (canvas.get(), context()) else {
            return;
        };
        let rect = element.get_bounding_client_rect();
        if rect.width() <= 0.0 || rect.height() <= 0.0 {
            return;
        }
        let scale = f64::from(width) / rect.width();
        let x = (f64::from(ev.client_x()) - rect.left()) * scale;
        let y = (f64::from(ev.client_y()) - rect.top()) * f64::from(height) / rect.height();
        ctx.set_fill_style_str("white");
        ctx.begin_path();
        let _ = ctx.arc(
            x,
            y,
            brush.get_untracked() * scale,
            0.0,
            std::f64::consts::TAU,
        );
        ctx.fill();
        painted.set(true);
    };
    let clear = move |_| {
        if let Some(ctx) = context() {
            ctx.clear_rect(0.0, 0.0, f64::from(width), f64::from(height));
        }
        painted.set(false);
    };
    let close = move |_| chat.editing.set(None);
    let apply = {
        let target = target.clone();
        move |ev: leptos::ev::SubmitEvent| {
            ev.prevent_default();
            let mask = if painted.get_untracked() {
                canvas.get().and_then(|c| mask_png(&c, width, height))
            } else {
                None
            };
            chat.edit(&target, &instruction.get_untracked(), mask);
            chat.editing.set(None);
            // A pending input image edited from its chip is used up, as a message would use it.
            if chat
                .input
                .with_untracked(|i| i.as_ref() == Some(&target.input))
            {
                chat.input.set(None);
            }
        }
    };
    let prompt_hint = if target.prompt.is_empty() {
        "Describe the picture you want".to_string()
    } else {
        format!("Changes to “{}”", target.prompt)
    };
    view! {
        <div class="edit-dialog" role="dialog" aria-label="Edit image">
            <form class="edit-panel" on:submit=apply>
                <h2>"Edit image"</h2>
                <p class="hint">
                    "Type an instruction (“make it night”, “add a hat”). To repaint only part of the "
                    "picture, paint over it: white is repainted, the rest is kept."
                </p>
                <div class="mask-stage" style=format!("aspect-ratio: {width} / {height}")>
                    <img src=target.input.url.clone() alt="Image to edit" />
                    <canvas
                        node_ref=canvas
                        width=width
                        height=height
                        aria-label="Mask"
                        data-testid="mask-canvas"
                        on:pointerdown=move |ev| {
                            ev.prevent_default();
                            painting.set(true);
                            dab(&ev);
                        }
                        on:pointermove=move |ev| {
                            if painting.get_untracked() {
                                dab(&ev);
                            }
                        }
                        on:pointerup=move |_| painting.set(false)
                        on:pointerleave=move |_| painting.set(false)
                    ></canvas>
                </div>
                <div class="edit-tools">
                    <label>
                        "Brush"
                        <input
                            type="range"
                            min="2"
                            max="40"
                            prop:value=move || brush.get().to_string()
                            on:input=move |ev| {
                                if let Ok(v) = event_target_value(&ev).parse() {
                                    brush.set(v);
                                }
                            }
                        />
                    </label>
                    <button type="button" class="secondary" on:click=clear disabled=move || !painted.get()>
                        "Clear mask"
                    </button>
                    <StrengthSlider chat />
                </div>
                <label for="edit-instruction" class="sr-only">"Edit instruction"</label>
                <textarea
                    id="edit-instruction"
                    rows="2"
                    placeholder=prompt_hint
                    prop:value=move || instruction.get()
                    on:input=move |ev| instruction.set(event_target_value(&ev))
                ></textarea>
                <div class="actions">
                    <button type="submit" class="primary">
                        {move || if painted.get() { "Inpaint" } else { "Apply edit" }}
                    </button>
                    <button type="button" class="secondary" on:click=close>
                        "Cancel"
                    </button>
                </div>
            </form>
        </div>
    }
}

/// The painted strokes as the API's mask: white on black, the image's size, base64 PNG (a data URL).
fn mask_png(strokes: &web_sys::HtmlCanvasElement, width: u32, height: u32) -> Option<String> {
    let document = window().document()?;
    let mask = document
        .create_element("canvas")
        .ok()?
        .dyn_into::<web_sys::HtmlCanvasElement>()
        .ok()?;
    mask.set_width(width);
    mask.set_height(height);
    let ctx = mask
        .get_context("2d")
        .ok()
        .flatten()?
        .dyn_into::<web_sys::CanvasRenderingContext2d>()
        .ok()?;
    ctx.set_fill_style_str("black");
    ctx.fill_rect(0.0, 0.0, f64::from(width), f64::from(height));
    ctx.draw_image_with_html_canvas_element(strokes, 0.0, 0.0)
        .ok()?;
    mask.to_data_url_with_type("image/png").ok()
}
