"""The model owner's service (`offsite serve`): bundles out, adapters in, and every customer's plugged model
served from one copy of the full model (`routing`)."""
