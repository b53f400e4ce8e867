// Render the TeX that pymdownx.arithmatex (generic mode) leaves in .arithmatex elements, \( ... \)
// inline and \[ ... \] displayed, with the vendored KaTeX. `document$` is mkdocs-material's
// page-load observable.
document$.subscribe(({ body }) => {
  for (const element of body.querySelectorAll(".arithmatex")) {
    renderMathInElement(element, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,  // a TeX error shows in red (.katex-error), and the docs test fails on it
    });
  }
});
