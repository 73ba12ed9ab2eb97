//! Prompt stage: minijinja templates rendered with the model's chat template.
