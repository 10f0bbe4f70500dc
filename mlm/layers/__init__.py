"""Building blocks with no knowledge of modalities: MLA / MHA / GQA attention, RoPE, level masks, SwiGLU."""
