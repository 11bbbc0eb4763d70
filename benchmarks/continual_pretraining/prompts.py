"""Fixed English chat prompts for forgetting measure (c): does the instruct model still say what it used to say?

The base model answers each prompt greedily once (through the tokenizer's chat template); the adapted model is
then scored on those very answers. The prompts are everyday instructions of the kind an instruct model is tuned
for (facts, definitions, short how-tos, small rewrites), short enough that a greedy answer of a few dozen tokens
is a meaningful part of the reply. They are part of the experiment's definition: changing them changes (c).
"""

ENGLISH_CHAT_PROMPTS = (
    "What is the capital of France?",
    "Explain what photosynthesis is in one sentence.",
    "Give me three tips for sleeping better.",
    "What is the difference between weather and climate?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Who wrote Romeo and Juliet?",
    "What does a computer's CPU do?",
    "Translate 'good morning' into French.",
    "Why is the sky blue?",
    "Summarize the plot of Cinderella in two sentences.",
    "What are the three primary colors?",
    "How many days are there in a leap year?",
    "Suggest a name for a small coffee shop.",
    "What is the boiling point of water at sea level?",
    "Explain what a noun is to a child.",
    "List four planets of the solar system.",
    "What should I pack for a weekend hiking trip?",
    "Rewrite this sentence more politely: Give me the report now.",
    "What is machine learning?",
    "How can I improve my handwriting?",
    "What is the largest ocean on Earth?",
    "Write a haiku about autumn leaves.",
    "Why do we need to drink water?",
)
