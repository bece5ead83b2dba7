//! The font of the benchmarks' charts (`bench compare`, `compare --guest`, `bench tune`):
//! plotters' bitmap backend draws text only with a font registered by name.

use anyhow::{Context, Result};

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers DejaVu Sans as plotters' "sans-serif".
pub fn register_font() -> Result<()> {
    use plotters::style::FontStyle;
    let font = FONT_PATHS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .context("no DejaVuSans.ttf (apt-get install fonts-dejavu-core)")?;
    // plotters keeps registered fonts for the life of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("DejaVuSans.ttf is not a usable font"))?;
    Ok(())
}
