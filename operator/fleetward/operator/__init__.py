"""The Kopf operator (handlers, reconcilers, apply layer, webhooks)."""
