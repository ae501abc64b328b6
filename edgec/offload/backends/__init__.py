"""One module per offload backend, each defining BACKEND (edgec.offload.Backend); edgec.offload lists them."""
