"""The graph: semantic config checks, building models and losses, the knowledge graph."""
