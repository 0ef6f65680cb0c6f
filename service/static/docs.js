// Starts Swagger UI on /docs. FastAPI's own /docs does this in an inline <script>, which the page's
// Content-Security-Policy (script-src 'self') forbids; this file is the same set-up, from this origin.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: new URL("openapi.json", document.baseURI).href, // relative: works behind a path prefix too
    dom_id: "#swagger-ui",
    layout: "BaseLayout", // FastAPI's defaults: no top bar, deep links to operations, extensions shown
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null, // never send the schema to validator.swagger.io
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
});
