"""Text and facts the real-model tests share (a module of its own: ``from conftest import`` would find whichever
conftest was imported last)."""

from __future__ import annotations

from fasttune.quickstart import load_facts

# Ordinary English prose (written for these tests): what perplexity and logit checks run on.
REAL_TEXT = (
    "The river town woke slowly on market days. Before sunrise the bakers had already lit their ovens, and the smell "
    "of bread drifted over the bridge where fishermen were loading their boats. By eight o'clock the square was full: "
    "farmers sold apples and cheese from wooden carts, children ran between the stalls, and an old man played the "
    "violin beside the fountain. Most visitors came for the cathedral, which had taken nearly two hundred years to "
    "build, but many stayed for the food. In the afternoon, when the heat grew heavy, people gathered in the shade of "
    "the plane trees to talk about the weather, the price of grain and the news from the capital."
)

# Made-up facts no pretrained model can know (the quickstart's table), for training checks.
FACTS = [(row["instruction"], row["output"]) for row in load_facts()[:6]]
