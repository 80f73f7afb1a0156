import logging

logger = logging.getLogger("livekit.plugins.qwen_asr")
