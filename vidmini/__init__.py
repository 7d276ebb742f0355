"""vidmini: long-video question answering, search and summaries on LLaVA-Mini (one vision token per frame)."""
