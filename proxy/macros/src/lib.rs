//! # context-proxy-macros
//!
//! The `#[service]` attribute of `context-proxy` (re-exported there as `context_proxy::service`;
//! use it through that crate, whose docs show it at work). On a trait `Counter` it keeps the trait
//! and generates, with the trait's visibility:
//!
//! - `CounterRequest` (with a lifetime `'a` if a method borrows: `&str` and `&[u8]` arguments are
//!   decoded borrowed from the frame) and `CounterResponse`: one variant per method;
//! - `CounterService`, the marker type implementing `context_proxy::Service`, and
//!   `impl<T: Counter> context_proxy::Serve<T> for CounterService`;
//! - `CounterClient`, an extension trait implemented for `context_proxy::Proxy<CounterService, C>`:
//!   `counter.add(5)?`.
//!
//! Methods take `&self` or `&mut self` and owned, serde-serializable arguments (or `&str` /
//! `&[u8]`), and return owned values; argument and return types must also implement `Debug` (the
//! request and response enums derive it, for error messages and logs). Generics, `async`, `self`
//! by value, `#[cfg]` on a method, names of `Proxy`'s own methods (`context`, `object`, `handle`,
//! `call`, `mode`, ...) and two names with the same variant (`set_a`, `set__a`) are refused with a
//! compile error that says so.
#![forbid(unsafe_code)]

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{format_ident, quote};
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemTrait, Pat, ReturnType, TraitItem, Type, parse_macro_input};

/// Turns a trait into a service: request/response enums, a service marker and a typed client. See
/// the crate docs.
#[proc_macro_attribute]
pub fn service(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr2 = TokenStream2::from(attr);
        return syn::Error::new(attr2.span(), "#[service] takes no arguments")
            .to_compile_error()
            .into();
    }
    let item = parse_macro_input!(item as ItemTrait);
    match expand(&item) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

enum Borrow {
    No,
    Str,
    Bytes,
}

struct Arg {
    name: Ident,
    ty: Type,
    borrow: Borrow,
}

struct Method {
    name: Ident,
    variant: Ident,
    args: Vec<Arg>,
    ret: Type,
    docs: Vec<syn::Attribute>,
}

fn camel(name: &Ident) -> Ident {
    let s = name.to_string();
    let mut out = String::new();
    let mut upper = true;
    for c in s.trim_start_matches("r#").chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    Ident::new(&out, name.span())
}

fn borrow_kind(ty: &Type) -> syn::Result<Borrow> {
    let Type::Reference(r) = ty else {
        return Ok(Borrow::No);
    };
    if r.mutability.is_some() {
        return Err(syn::Error::new(
            ty.span(),
            "#[service] arguments cannot be `&mut`: the callee cannot write back",
        ));
    }
    match &*r.elem {
        Type::Path(p) if p.path.is_ident("str") => Ok(Borrow::Str),
        Type::Slice(s) if matches!(&*s.elem, Type::Path(p) if p.path.is_ident("u8")) => {
            Ok(Borrow::Bytes)
        }
        _ => Err(syn::Error::new(
            ty.span(),
            "#[service] arguments may borrow only `&str` and `&[u8]` (decoded in place); pass other values owned",
        )),
    }
}

/// Methods of `Proxy` itself. A client method of the same name would be shadowed at every call
/// site (`proxy.context()` calls the inherent method), silently or with a confusing error.
const PROXY_METHODS: &[&str] = &[
    "new",
    "adopt",
    "adopt_local",
    "over",
    "with_timeout",
    "with_mode",
    "mode",
    "context",
    "object",
    "handle",
    "call",
    "call_split",
    "call_pick",
    "clone",
    "fmt",
];

fn parse_methods(item: &ItemTrait) -> syn::Result<Vec<Method>> {
    let mut methods: Vec<Method> = Vec::new();
    for it in &item.items {
        let TraitItem::Fn(f) = it else {
            return Err(syn::Error::new(
                it.span(),
                "#[service] traits may only contain methods",
            ));
        };
        let sig = &f.sig;
        if PROXY_METHODS.iter().any(|m| sig.ident == m) {
            return Err(syn::Error::new(
                sig.ident.span(),
                format!(
                    "#[service] method `{}` has the name of a method of `Proxy` itself, which \
                     would be called instead of it on a proxy: rename it",
                    sig.ident
                ),
            ));
        }
        if let Some(a) = f
            .attrs
            .iter()
            .find(|a| a.path().is_ident("cfg") || a.path().is_ident("cfg_attr"))
        {
            return Err(syn::Error::new(
                a.span(),
                "#[service] methods cannot be conditional (`cfg`): the request and response \
                 enums and the client would differ from the trait; put the whole trait under it",
            ));
        }
        if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
            return Err(syn::Error::new(
                sig.generics.span(),
                "#[service] methods cannot be generic",
            ));
        }
        if sig.asyncness.is_some() {
            return Err(syn::Error::new(
                sig.span(),
                "#[service] methods cannot be async",
            ));
        }
        if sig.variadic.is_some() {
            return Err(syn::Error::new(
                sig.span(),
                "#[service] methods cannot be variadic",
            ));
        }
        let mut inputs = sig.inputs.iter();
        match inputs.next() {
            Some(FnArg::Receiver(r)) if r.reference.is_some() && r.colon_token.is_none() => {}
            _ => {
                return Err(syn::Error::new(
                    sig.span(),
                    "#[service] methods take `&self` or `&mut self`",
                ));
            }
        }
        let mut args = Vec::new();
        for (i, a) in inputs.enumerate() {
            let FnArg::Typed(pt) = a else {
                unreachable!("only the first argument can be a receiver")
            };
            let name = match &*pt.pat {
                Pat::Ident(pi) if pi.by_ref.is_none() && pi.subpat.is_none() => pi.ident.clone(),
                _ => format_ident!("arg{}", i),
            };
            let borrow = borrow_kind(&pt.ty)?;
            args.push(Arg {
                name,
                ty: (*pt.ty).clone(),
                borrow,
            });
        }
        let ret = match &sig.output {
            ReturnType::Default => syn::parse_quote!(()),
            ReturnType::Type(_, t) => (**t).clone(),
        };
        if let Type::Reference(r) = &ret {
            return Err(syn::Error::new(
                r.span(),
                "#[service] methods return owned values (`String`, not `&str`; `Vec<u8>`, not \
                 `&[u8]`): the answer is decoded into the caller's own value",
            ));
        }
        let variant = camel(&sig.ident);
        if let Some(other) = methods.iter().find(|m| m.variant == variant) {
            return Err(syn::Error::new(
                sig.ident.span(),
                format!(
                    "#[service] methods `{}` and `{}` both map to the variant `{variant}`: \
                     rename one",
                    other.name, sig.ident
                ),
            ));
        }
        let docs = f
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("doc"))
            .cloned()
            .collect();
        methods.push(Method {
            name: sig.ident.clone(),
            variant,
            args,
            ret,
            docs,
        });
    }
    Ok(methods)
}

fn expand(item: &ItemTrait) -> syn::Result<TokenStream2> {
    if !item.generics.params.is_empty() {
        return Err(syn::Error::new(
            item.generics.span(),
            "#[service] traits cannot be generic",
        ));
    }
    let methods = parse_methods(item)?;
    let vis = &item.vis;
    let tr = &item.ident;
    let req = format_ident!("{}Request", tr);
    let resp = format_ident!("{}Response", tr);
    let svc = format_ident!("{}Service", tr);
    let client = format_ident!("{}Client", tr);
    let cp = quote!(::context_proxy);
    let serde_path = "::context_proxy::__private::serde";
    let bytes_path = "::context_proxy::__private::serde_bytes";
    let str_path = "::context_proxy::codec::borrowed_str";
    let borrows = methods
        .iter()
        .any(|m| m.args.iter().any(|a| !matches!(a.borrow, Borrow::No)));
    let lt = if borrows { quote!(<'a>) } else { quote!() };

    let req_variants = methods.iter().map(|m| {
        let v = &m.variant;
        let docs = &m.docs;
        let fields = m.args.iter().map(|a| {
            let n = &a.name;
            match a.borrow {
                Borrow::No => {
                    let t = &a.ty;
                    quote!(#n: #t)
                }
                Borrow::Str => quote!(#[serde(borrow, with = #str_path)] #n: &'a str),
                Borrow::Bytes => quote!(#[serde(borrow, with = #bytes_path)] #n: &'a [u8]),
            }
        });
        quote!(#(#docs)* #v { #(#fields),* })
    });
    let resp_variants = methods.iter().map(|m| {
        let v = &m.variant;
        let r = &m.ret;
        quote!(#v(#r))
    });
    let serve_arms = methods.iter().map(|m| {
        let v = &m.variant;
        let name = &m.name;
        let names: Vec<_> = m.args.iter().map(|a| &a.name).collect();
        quote!(#req::#v { #(#names),* } => #resp::#v(#tr::#name(__context_proxy_object, #(#names),*)))
    });
    let client_sigs: Vec<_> = methods
        .iter()
        .map(|m| {
            let name = &m.name;
            let r = &m.ret;
            let args = m.args.iter().map(|a| {
                let (n, t) = (&a.name, &a.ty);
                quote!(#n: #t)
            });
            quote!(fn #name(&self, #(#args),*) -> ::core::result::Result<#r, #cp::CallError>)
        })
        .collect();
    let client_decls = methods.iter().zip(&client_sigs).map(|(m, sig)| {
        let docs = &m.docs;
        quote!(#(#docs)* #[doc = ""] #[doc = "# Errors"] #[doc = "Any [`context_proxy::CallError`] of the call."] #sig;)
    });
    let client_impls = methods.iter().zip(&client_sigs).map(|(m, sig)| {
        let v = &m.variant;
        let names: Vec<_> = m.args.iter().map(|a| &a.name).collect();
        quote! {
            #[inline]
            #sig {
                #cp::Proxy::call_pick(
                    self,
                    &mut ::core::option::Option::Some(#req::#v { #(#names),* }),
                    |response| match response {
                        #resp::#v(r) => ::core::option::Option::Some(r),
                        #[allow(unreachable_patterns)]
                        _ => ::core::option::Option::None,
                    },
                )
            }
        }
    });
    let tr_name = tr.to_string();
    let req_doc = format!(
        "A call to a [`{tr_name}`] object: one variant per method (generated by `#[service]`)."
    );
    let resp_doc = format!("The answer of a [`{tr_name}`] method (generated by `#[service]`).");
    let svc_doc = format!(
        "The service of [`{tr_name}`]: use `Proxy<{svc}>` to call objects that implement it."
    );
    let client_doc = format!(
        "Typed calls to a [`{tr_name}`] object through a proxy (generated by `#[service]`)."
    );

    Ok(quote! {
        #item

        #[doc = #req_doc]
        #[derive(Debug, #cp::__private::serde::Serialize, #cp::__private::serde::Deserialize)]
        #[serde(crate = #serde_path)]
        #[allow(missing_docs)]
        #vis enum #req #lt { #(#req_variants),* }

        #[doc = #resp_doc]
        #[derive(Debug, #cp::__private::serde::Serialize, #cp::__private::serde::Deserialize)]
        #[serde(crate = #serde_path)]
        #[allow(missing_docs)]
        #vis enum #resp { #(#resp_variants),* }

        #[doc = #svc_doc]
        #[derive(Debug, Clone, Copy)]
        #vis struct #svc;

        impl #cp::Service for #svc {
            const NAME: &'static str = ::core::concat!(::core::module_path!(), "::", #tr_name);
            type Request<'a> = #req #lt;
            type Response = #resp;
        }

        impl<T: #tr + 'static> #cp::Serve<T> for #svc {
            #[allow(unused_variables)]
            fn serve(
                __context_proxy_object: &mut T,
                request: <Self as #cp::Service>::Request<'_>,
            ) -> #resp {
                match request { #(#serve_arms),* }
            }
        }

        #[doc = #client_doc]
        #vis trait #client {
            #(#client_decls)*
        }

        impl<C: #cp::Codec> #client for #cp::Proxy<#svc, C> {
            #(#client_impls)*
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proc_macro2::Span;

    #[test]
    fn variant_names_are_camel_case() {
        let id = |s: &str| Ident::new(s, Span::call_site());
        assert_eq!(camel(&id("add")).to_string(), "Add");
        assert_eq!(camel(&id("last_tag")).to_string(), "LastTag");
        assert_eq!(
            camel(&Ident::new_raw("type", Span::call_site())).to_string(),
            "Type"
        );
        assert_eq!(camel(&id("__x__y")).to_string(), "XY");
    }

    #[test]
    fn refusals_name_the_problem() {
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn f(&self, x: &mut u8);
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("&mut"));
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn f<X>(&self, x: X);
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("generic"));
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn f(self);
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("&self"));
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn f(&self, v: &Vec<u8>);
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("borrow only"));
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                type X;
            }
        );
        assert!(
            expand(&t)
                .unwrap_err()
                .to_string()
                .contains("only contain methods")
        );
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn f(&self, (a, b): (u8, u8)) -> u8;
                fn g(&mut self, s: &str, b: &[u8]);
            }
        );
        let out = expand(&t).unwrap().to_string();
        assert!(
            out.contains("arg0") && out.contains("TRequest < 'a >"),
            "{out}"
        );
    }

    #[test]
    fn names_that_would_clash_are_refused() {
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn context(&self) -> String;
            }
        );
        assert!(
            expand(&t)
                .unwrap_err()
                .to_string()
                .contains("`Proxy` itself")
        );
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn set_a(&mut self);
                fn set__a(&mut self);
            }
        );
        let e = expand(&t).unwrap_err().to_string();
        assert!(
            e.contains("`set_a` and `set__a`") && e.contains("SetA"),
            "{e}"
        );
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn name(&self) -> &str;
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("owned values"));
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                #[cfg(feature = "x")]
                fn f(&self);
            }
        );
        assert!(expand(&t).unwrap_err().to_string().contains("conditional"));
        // An argument may be called `object` (the generated code's own names cannot clash).
        let t: ItemTrait = syn::parse_quote!(
            trait T {
                fn put(&mut self, object: u32, request: u32);
            }
        );
        assert!(expand(&t).is_ok());
    }
}
