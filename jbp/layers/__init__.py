"""The document's layers, one file per family: each rule's forward, residuals and backward side
by side, and the public function declared once beside it (``jbp._registry``)."""
