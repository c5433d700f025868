"""open_clip's CLIP with a text tower that also reads tokens cut short of its context.

open_clip's own CLIP text tower adds all of its positional embedding and attention mask, so it
takes only full-width tokens (77 for OpenAI's models), while prompts use about ten of them and
the tower's cost is linear in the tokens it reads. Cut short, the tower gives the same
features: its attention is causal, so no position reads a later one, and the pooled token (the
end-of-text token, or the one the pool type names) is kept. reclip.features checks that once
per run against the uncut tokens before it cuts anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from open_clip.transformer import text_global_pool
from torch import nn


class CutTextCLIP(CLIP):
    """open_clip's CLIP whose encode_text takes tokens of any width up to its context; at the
    full width it computes what open_clip's does (a test holds it to that)."""

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        width = text.shape[1]
        cast = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast) + self.positional_embedding[:width].to(cast)
        x = self.transformer(x, attn_mask=self.attn_mask[:width, :width])
        x = text_global_pool(self.ln_final(x), text, self.text_pool_type,
                             eos_token_id=getattr(self, "text_eos_id", None))
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x
